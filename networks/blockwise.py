"""Optimizer parameter groups: one per component (unet_lr / text_encoder_lr), split by sd-scripts'
block-wise learning-rate weights (down_lr_weight, mid_lr_weight, up_lr_weight) and by LoRA+
(loraplus_lr_ratio: the up matrices, lora_B, learn ratio x faster)."""
from __future__ import annotations

from networks import algorithms
from networks.settings import NetworkSettings
from networks.targets import AdaptedComponent, lr_weight


def param_groups(adapted: list[AdaptedComponent], s: NetworkSettings, unet_lr: float | None,
                 text_encoder_lr: float | list[float] | None, learning_rate: float) -> list[dict]:
    """[{"params": [...], "lr": ...}, ...], in component order; groups of the same lr are merged.
    A list of text-encoder rates gives one per encoder in order (as sd-scripts: a shorter list repeats its
    last rate)."""
    groups: list[dict] = []
    encoders = [c.target.component for c in adapted if c.target.component != "denoiser"]
    for component in adapted:
        is_unet = component.target.component == "denoiser"
        base = unet_lr if is_unet else _encoder_rate(text_encoder_lr, encoders.index(component.target.component))
        base = learning_rate if base is None else base
        ratio = (s.loraplus_unet_lr_ratio if is_unet else s.loraplus_text_encoder_lr_ratio) or None
        by_lr: dict[float, list] = {}
        for path, layer in component.adapter_layers():
            lr = base * lr_weight(s, component.block_of(path))
            up = {id(p) for p in algorithms.up_parameters(layer)} if ratio else set()
            for param in algorithms.parameters(layer).values():
                by_lr.setdefault(lr * ratio if id(param) in up else lr, []).append(param)
        groups += [{"params": params, "lr": lr} for lr, params in by_lr.items()]
    return groups


def _encoder_rate(rates: float | list[float] | None, index: int) -> float | None:
    if not isinstance(rates, list):
        return rates
    return rates[min(index, len(rates) - 1)] if rates else None
