"""LoRA and LoCon through peft: which layers get an adapter, with which rank and alpha.

peft does the math (lora_A = kohya lora_down, lora_B = kohya lora_up, scale = alpha / rank, A
initialised Kaiming-uniform and B zero, as kohya). This module picks the layers the way sd-scripts'
networks.lora does, so files and results carry over: Linear and 1x1 Conv2d layers inside the family's
`linear_parents` get rank network_dim; with LoCon (conv_dim set), the layers inside `conv_parents` get
adapters too, 3x3 convs with rank conv_dim.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from library.families.base import AdapterTarget

ADAPTER = "default"


@dataclass(frozen=True)
class LoraSettings:
    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float | None = None

    @classmethod
    def from_network_section(cls, net) -> "LoraSettings":
        from library.config import parse_kv_args

        args = parse_kv_args(net.network_args)
        conv_dim = net.conv_dim if net.conv_dim is not None else args.get("conv_dim")
        conv_alpha = net.conv_alpha if net.conv_alpha is not None else args.get("conv_alpha")
        dropout = net.network_dropout if net.network_dropout is not None else args.get("dropout")
        return cls(dim=net.network_dim, alpha=float(net.network_alpha),
                   conv_dim=int(conv_dim) if conv_dim else None,
                   conv_alpha=float(conv_alpha) if conv_alpha is not None else (1.0 if conv_dim else None),
                   dropout=float(dropout) if dropout else None)

    def as_args(self) -> dict[str, str]:
        """The network_args of the file metadata (ss_network_args), as sd-scripts writes them."""
        if not self.conv_dim:
            return {}
        return {"conv_dim": str(self.conv_dim), "conv_alpha": str(self.conv_alpha)}


@dataclass
class AdaptedComponent:
    """One model component with adapters in it: the layer names and each layer's (rank, alpha)."""
    target: AdapterTarget
    module: nn.Module
    layers: dict[str, tuple[int, float]] = field(default_factory=dict)

    def lora_layers(self):
        """(module path, peft LoraLayer) for every adapted layer, in module order."""
        for name, module in self.module.named_modules():
            if name in self.layers and isinstance(module, LoraLayer):
                yield name, module

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, layer in self.lora_layers() for p in
                (*layer.lora_A[ADAPTER].parameters(), *layer.lora_B[ADAPTER].parameters())]


def find_layers(root: nn.Module, target: AdapterTarget, settings: LoraSettings) -> dict[str, tuple[int, float]]:
    """Module paths of the layers to adapt -> (rank, alpha), sd-scripts' selection rule."""
    layers: dict[str, tuple[int, float]] = {}
    linear = (settings.dim, settings.alpha)
    parents = set(target.linear_parents) | (set(target.conv_parents) if settings.conv_dim else set())
    for name, module in root.named_modules():
        if type(module).__name__ not in parents:
            continue
        for child_name, child in module.named_modules():
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) or _is_conv(child, kernel=(1, 1)):
                layers[full] = linear
            elif _is_conv(child) and type(module).__name__ in target.conv_parents and settings.conv_dim:
                layers[full] = (settings.conv_dim, settings.conv_alpha)
    return layers


def _is_conv(module: nn.Module, kernel: tuple[int, int] | None = None) -> bool:
    return isinstance(module, nn.Conv2d) and (kernel is None or module.kernel_size == kernel)


def inject(module: nn.Module, target: AdapterTarget, settings: LoraSettings) -> AdaptedComponent:
    """Put LoRA layers into `module` (in place) and return what was adapted."""
    layers = find_layers(module, target, settings)
    if not layers:
        raise ValueError(f"no layers to adapt in {type(module).__name__} for {target.kohya_prefix}")
    config = LoraConfig(
        r=settings.dim, lora_alpha=settings.alpha, lora_dropout=settings.dropout or 0.0,
        target_modules=sorted(layers),
        rank_pattern={_exact(n): r for n, (r, a) in layers.items() if r != settings.dim},
        alpha_pattern={_exact(n): a for n, (r, a) in layers.items() if a != settings.alpha},
        init_lora_weights=True)
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    adapted = AdaptedComponent(target, module, layers)
    found = {name for name, _ in adapted.lora_layers()}
    if found != set(layers):
        raise RuntimeError(f"peft adapted {len(found)} of {len(layers)} layers: {sorted(set(layers) - found)[:3]}")
    return adapted


def _exact(name: str) -> str:
    """A peft rank/alpha pattern (a regex matched at the end of the path) for exactly this module path."""
    return re.escape(name)


def set_adapters_enabled(adapted: list[AdaptedComponent], enabled: bool) -> None:
    for component in adapted:
        for _, layer in component.lora_layers():
            layer.enable_adapters(enabled)


def trainable_parameter_count(adapted: list[AdaptedComponent]) -> int:
    return sum(p.numel() for c in adapted for p in c.parameters())


@torch.no_grad()
def copy_weights(adapted: AdaptedComponent, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set (lora_down, lora_up) of each named layer."""
    modules = dict(adapted.lora_layers())
    for name, (down, up) in weights.items():
        layer = modules[name]
        layer.lora_A[ADAPTER].weight.copy_(down)
        layer.lora_B[ADAPTER].weight.copy_(up)
