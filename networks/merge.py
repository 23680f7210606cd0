"""Merge a kohya LoRA file into a model's weights by the published formula, without peft:

    W' = W + ratio * (alpha / rank) * up @ down     (convs: up is 1x1, down carries the kernel)
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from networks.kohya import LoraFileError, kohya_name


@torch.no_grad()
def merge_lora(modules: dict[str, nn.Module], targets, path: str, ratio: float = 1.0) -> int:
    """Add the file's deltas into `modules` (component name -> module) in place; returns layers merged.
    `targets` are the family's AdapterTargets, which say each component's kohya prefix."""
    tensors = load_file(path)
    layers = {}
    for target in targets:
        for module_path, module in modules[target.component].named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                layers[kohya_name(target, module_path)] = module
    names = {key.split(".", 1)[0] for key in tensors}
    unknown = sorted(names - set(layers))
    if unknown:
        raise LoraFileError(f"{path}: no layer for {unknown[:5]}")
    for name in names:
        layer = layers[name]
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else rank
        delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
        layer.weight += (ratio * alpha / rank * delta).to(layer.weight.dtype)
    return len(names)
