"""Which layers get an adapter, with which rank and alpha, and the adapted components.

The layers are picked the way sd-scripts' networks.lora picks them, so files and results carry over:
Linear and 1x1 Conv2d layers inside the family's `linear_parents` get rank network_dim; with LoCon
(conv_dim or conv_block_dims), the 3x3 convs inside `conv_parents` get conv_dim. Block-wise settings
(block_dims, block_alphas, conv_block_dims, conv_block_alphas; a zero lr weight drops a block) use the
family's kohya block index of each U-Net layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from library.families.base import AdapterTarget
from networks import algorithms, dropout, oft
from networks.algorithms import ADAPTER
from networks.settings import NUM_UPDOWN, PRESETS, NetworkSettings


@dataclass
class AdaptedComponent:
    """One model component with adapters in it: the layer names and each layer's (rank, alpha)."""
    target: AdapterTarget
    module: nn.Module
    layers: dict[str, tuple[int, float]] = field(default_factory=dict)
    algo: str = "lora"

    def adapter_layers(self):
        """(module path, peft layer) for every adapted layer, in module order."""
        for name, module in self.module.named_modules():
            if name in self.layers and isinstance(module, BaseTunerLayer):
                yield name, module

    lora_layers = adapter_layers  # the name of LoRA-only days

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, layer in self.adapter_layers() for p in algorithms.parameters(layer).values()]

    def block_of(self, path: str) -> int | None:
        return self.target.block_index(path) if self.target.block_index else None


def find_layers(root: nn.Module, target: AdapterTarget, s: NetworkSettings) -> dict[str, tuple[int, float]]:
    """Module paths of the layers to adapt -> (rank, alpha), sd-scripts' selection rule narrowed by LyCORIS'
    preset (networks/settings.py PRESETS)."""
    blockwise = (s.block_dims, s.conv_block_dims, s.down_lr_weight, s.mid_lr_weight, s.up_lr_weight)
    if target.component == "denoiser" and not target.block_index and any(v is not None for v in blockwise):
        raise ValueError("block_dims / conv_block_dims / *_lr_weight: this model family has no kohya block index")
    text_layers, denoiser_layers, convs = PRESETS[s.preset]
    kind = denoiser_layers if target.component == "denoiser" else text_layers
    if kind is None:
        return {}
    if kind == "convblock" and not (s.conv_dim or s.conv_block_dims):
        s = replace(s, conv_dim=s.dim, conv_alpha=s.alpha)  # LyCORIS: convs at network_dim unless conv_dim
    with_conv = bool(s.conv_dim or s.conv_block_dims) and convs
    parents = {"transformer": set(target.linear_parents), "convblock": set(target.conv_parents)}.get(
        kind, set(target.linear_parents) | (set(target.conv_parents) if with_conv else set()))
    attention = _attention_paths(root) if kind == "attention" else None
    layers: dict[str, tuple[int, float]] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in parents:
            continue
        for child_name, child in module.named_modules():
            path = f"{name}.{child_name}" if name else child_name
            if attention is not None and not any(path.startswith(a + ".") for a in attention):
                continue
            if in_llm_adapter(target, path) and not s.train_llm_adapter:
                continue
            if isinstance(child, nn.Linear) or _is_conv(child, kernel=(1, 1)):
                rank_alpha = _linear_rank(s, _block(target, path))
            elif _is_conv(child) and type(module).__name__ in target.conv_parents and with_conv:
                rank_alpha = _conv_rank(s, _block(target, path))
            else:
                continue
            if rank_alpha[0] > 0 and lr_weight(s, _block(target, path)) != 0 and _chosen_block(target, path, s):
                layers[path] = rank_alpha
    return layers


def in_llm_adapter(target: AdapterTarget, path: str) -> bool:
    """Whether the layer at `path` is in the component's LLM adapter (AdapterTarget.llm_adapter_path)."""
    return bool(target.llm_adapter_path) and path.startswith(target.llm_adapter_path + ".")


def _chosen_block(target: AdapterTarget, path: str, s: NetworkSettings) -> bool:
    """sd-scripts' lora_flux selection by the layer's kohya name: train_blocks (double / single blocks only)
    and the chosen indices of each kind; layers outside such blocks are never dropped by it."""
    import re

    name = target.kohya_layout(path)[0] if target.kohya_layout and target.kohya_layout(path) else path
    m = re.match(r"(double|single)_blocks\.(\d+)\.", name)
    if m is None:
        return s.train_blocks == "all"
    chosen = s.double_blocks if m.group(1) == "double" else s.single_blocks
    return s.train_blocks in ("all", m.group(1)) and (chosen is None or int(m.group(2)) in chosen)


def _attention_paths(root: nn.Module) -> list[str]:
    """Paths of the attention modules (class names ending in Attention: diffusers' Attention, CLIPAttention,
    ...), for LyCORIS' attn-only preset."""
    return [name for name, module in root.named_modules() if name and type(module).__name__.endswith("Attention")]


def _block(target: AdapterTarget, path: str) -> int | None:
    return target.block_index(path) if target.block_index else None


def _linear_rank(s: NetworkSettings, block: int | None) -> tuple[int, float]:
    if s.block_dims is None or block is None:
        return s.dim, s.alpha
    return s.block_dims[block], s.block_alphas[block] if s.block_alphas else s.alpha


def _conv_rank(s: NetworkSettings, block: int | None) -> tuple[int, float]:
    if s.conv_block_dims is None or block is None:
        return (s.conv_dim or 0), (s.conv_alpha or 1.0)
    alphas = s.conv_block_alphas
    return s.conv_block_dims[block], alphas[block] if alphas else (s.conv_alpha or 1.0)


def lr_weight(s: NetworkSettings, block: int | None) -> float:
    """sd-scripts' per-block learning-rate weight: down_lr_weight[i] for IN i, mid, up_lr_weight[i] for OUT i."""
    if block is None:
        return 1.0
    if block < NUM_UPDOWN:
        return s.down_lr_weight[block] if s.down_lr_weight else 1.0
    if block == NUM_UPDOWN:
        return s.mid_lr_weight if s.mid_lr_weight is not None else 1.0
    return s.up_lr_weight[block - NUM_UPDOWN - 1] if s.up_lr_weight else 1.0


def _is_conv(module: nn.Module, kernel: tuple[int, int] | None = None) -> bool:
    return isinstance(module, nn.Conv2d) and (kernel is None or module.kernel_size == kernel)


def inject(module: nn.Module, target: AdapterTarget, settings: NetworkSettings) -> AdaptedComponent:
    """Put the adapter into `module` (in place) and return what was adapted."""
    layers = find_layers(module, target, settings)
    if not layers:
        raise ValueError(f"no layers to adapt in {type(module).__name__} for {target.kohya_prefix}")
    if settings.algo in oft.ALGORITHMS:  # output rotations of our own (networks/oft.py says why)
        layers = oft.inject(module, target, layers, settings)
    else:
        inject_adapter_in_model(algorithms.peft_config(settings, layers), module, adapter_name=ADAPTER)
    adapted = AdaptedComponent(target, module, layers, settings.algo)
    found = dict(adapted.adapter_layers())
    if set(found) != set(layers):
        raise RuntimeError(f"peft adapted {len(found)} of {len(layers)} layers: {sorted(set(layers) - set(found))[:3]}")
    for path, layer in found.items():
        layers[path] = algorithms.after_injection(settings, layer, layers[path])
    dropout.install(adapted, settings)  # LoRA's rank / module dropout (peft's LoRA has neither)
    return adapted


def set_adapters_enabled(adapted: list[AdaptedComponent], enabled: bool) -> None:
    for component in adapted:
        for _, layer in component.adapter_layers():
            layer.enable_adapters(enabled)


def trainable_parameter_count(adapted: list[AdaptedComponent]) -> int:
    return sum(p.numel() for c in adapted for p in c.parameters())
