"""LoRA / LoCon as the rest of the code knew them before the adapter zoo: the settings now live in
networks/settings.py (every algorithm), the injection in networks/targets.py, peft configs in
networks/algorithms.py."""
from __future__ import annotations

import torch

from networks.algorithms import ADAPTER  # noqa: F401
from networks.settings import NetworkSettings
from networks.targets import (AdaptedComponent, find_layers, inject, set_adapters_enabled,  # noqa: F401
                              trainable_parameter_count)

LoraSettings = NetworkSettings


@torch.no_grad()
def copy_weights(adapted: AdaptedComponent, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set (lora_down, lora_up) of each named LoRA layer."""
    modules = dict(adapted.adapter_layers())
    for name, (down, up) in weights.items():
        modules[name].lora_A[ADAPTER].weight.copy_(down)
        modules[name].lora_B[ADAPTER].weight.copy_(up)
