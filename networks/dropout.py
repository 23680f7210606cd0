"""sd-scripts' LoRA rank_dropout and module_dropout, on peft LoRA layers (LoHa / LoKr / OFT take them from peft).

In a training forward pass, module_dropout skips a layer's adapter with that probability (one draw per call,
for the whole batch), and rank_dropout zeroes each rank of the down projection's output with that
probability per example, scaling the rest by 1 / (1 - p), as sd-scripts' networks.lora does. Both act through
a forward hook on the down projection (lora_A), so the up projection sees zeros where sd-scripts skips.
Evaluation and saving are untouched; draws use torch's global generator (seeded by the run).
"""
from __future__ import annotations

import torch
from torch import nn

from networks.settings import NetworkSettings


def install(component, settings: NetworkSettings) -> int:
    """Hooks on the LoRA down projections of one adapted component; returns how many."""
    if settings.algo not in ("lora", "locon") or not (settings.rank_dropout or settings.module_dropout):
        return 0
    hooks = 0
    for _, layer in component.adapter_layers():
        for down in layer.lora_A.values():
            down.register_forward_hook(_hook(settings.rank_dropout, settings.module_dropout))
            hooks += 1
    return hooks


def _hook(rank_dropout: float, module_dropout: float):
    def after_down(module: nn.Module, _inputs, out: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        if module_dropout and torch.rand(1).item() < module_dropout:
            return out * 0
        if rank_dropout:
            shape = (out.shape[0], out.shape[1], 1, 1) if out.dim() == 4 else (out.shape[0],) + (1,) * (
                out.dim() - 2) + (out.shape[-1],)
            keep = (torch.rand(shape, device=out.device) > rank_dropout).to(out.dtype)
            return out * keep / (1.0 - rank_dropout)
        return None
    return after_down
