"""scale_weight_norms: sd-scripts' max-norm regularisation. After each optimizer step, a layer whose
weight delta has a Frobenius norm above the limit gets its two factors scaled by sqrt(limit / norm),
which scales the delta to the limit exactly (each factor enters the delta linearly)."""
from __future__ import annotations

import torch

from networks import algorithms
from networks.algorithms import ADAPTER
from networks.targets import AdaptedComponent

# the two factors each algorithm's delta is linear in
FACTORS = {"lora": ("lora_A.weight", "lora_B.weight"), "locon": ("lora_A.weight", "lora_B.weight"),
           "dora": ("lora_A.weight", "lora_B.weight"), "loha": ("hada_w1_b", "hada_w2_b"),
           "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a"))}


@torch.no_grad()
def apply(adapted: list[AdaptedComponent], max_norm: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys scaled, mean delta norm, max delta norm) over every adapted layer, as tensors on the device: no
    value is read by the host (a layer under the limit is multiplied by exactly 1), so the step has no sync;
    the recipe reads them with the loss, at the logging cadence."""
    norms = []
    for component in adapted:
        for _, layer in component.adapter_layers():
            norm = layer.get_delta_weight(ADAPTER).float().norm()
            norms.append(norm)
            factor = torch.where(norm > max_norm, (max_norm / norm) ** 0.5, torch.ones_like(norm))
            params = algorithms.parameters(layer)
            for names in FACTORS[component.algo]:
                name = next(n for n in ((names,) if isinstance(names, str) else names) if n in params)
                params[name].mul_(factor.to(params[name].dtype))
    if not norms:
        return torch.tensor(0), torch.tensor(0.0), torch.tensor(0.0)
    norms = torch.stack(norms)
    return (norms > max_norm).sum(), norms.mean(), norms.max()
