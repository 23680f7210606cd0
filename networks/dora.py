"""DoRA with the weight decomposed along the input axis: the form every UI applies to a `dora_scale` file.

    W' = (W + ΔW) · diag(m / ||W + ΔW||_col)        ΔW = (alpha / rank) · up @ down

where ||·||_col is the norm of each input column (for a conv: over output channels and kernel positions) plus
float32's eps, and m, one magnitude per input channel, is trained (starting at ||W||_col, so the adapter starts
as the identity). The file stores m as `dora_scale` of shape (1, in) or (1, in, 1, 1).

Why this axis and not peft's (which normalises each output row): read from their published sources,
- ComfyUI (comfy/weight_adapter/base.py weight_decompose) normalises W + ΔW per input column when
  dora_scale.shape[0] != out; with an (out, 1) scale it divides by the norm of the *un-adapted* W instead,
  so an output-axis file renders differently there than it was trained (by up to 5e-3 on our tiny models);
- Forge (which vendors ComfyUI's function) and A1111 (extensions-builtin/Lora network.py
  apply_weight_decompose) always normalise per input column;
- LyCORIS trains this form with network_args `wd_on_output=False` (its default is the output axis);
  ss_network_args of our files say so.
The input axis is also invariant under a reordering of the output rows, so the layers a checkpoint stores
row-permuted (SD3's last norm1_context) or as a slice of a fused weight (FLUX / SD3 q, k, v) render the same
in checkpoint order. peft's DoRA cannot normalise this axis, so it is a peft LoRA variant of ours: peft keeps
lora_A / lora_B, dropout, merging and adapter switching; this module adds the magnitude and the formula.

Cost: scaling the input columns does not commute with the layer as an output scale does, so the forward
computes the base layer once more on (s - 1) · x (what peft's DoRA does whenever dropout is on).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

MAGNITUDE = "lora_magnitude_vector"


class InputMagnitude(nn.Module):
    """m: one trainable magnitude per input channel of the base layer."""

    def __init__(self, columns: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(columns.clone())


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_col + eps: the norm of each input column (in,), as ComfyUI / LyCORIS compute it."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return columns.norm(dim=1) + torch.finfo(torch.float32).eps


def file_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """dora_scale's shape in files: (1, in) or (1, in, 1, 1)."""
    return (1, weight.shape[1], *[1] * (weight.dim() - 2))


def attach(layer, adapter: str) -> None:
    """Give a fresh peft LoRA layer (use_dora=False) the magnitude and this variant."""
    base = layer.get_base_layer()
    if isinstance(base, nn.Conv2d) and base.groups != 1:
        raise ValueError(f"DoRA: grouped conv ({base}) has no per-input-channel decomposition")
    if MAGNITUDE not in layer.adapter_layer_names:
        layer.adapter_layer_names = layer.adapter_layer_names[:] + (MAGNITUDE,)
    weight = _base_weight(base, torch.float32)
    magnitude = InputMagnitude(column_norm(weight)).to(layer.lora_A[adapter].weight.device)
    layer.lora_magnitude_vector[adapter] = magnitude
    layer.lora_variant[adapter] = InputAxisDora()


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return base.weight.detach().to(dtype)


def _delta(layer, adapter: str, dtype: torch.dtype) -> torch.Tensor:
    """scaling · up @ down in the base weight's shape."""
    base = layer.get_base_layer()
    a, b = layer.lora_A[adapter].weight.to(dtype), layer.lora_B[adapter].weight.to(dtype)
    return (b.flatten(1) @ a.flatten(1)).reshape(base.weight.shape) * layer.scaling[adapter]


def column_scale(layer, adapter: str) -> torch.Tensor:
    """s = m / ||W + ΔW||_col, (in,), differentiable in m, up and down."""
    dtype = layer.lora_A[adapter].weight.dtype
    combined = _base_weight(layer.get_base_layer(), dtype) + _delta(layer, adapter, dtype)
    return layer.lora_magnitude_vector[adapter].weight / column_norm(combined)


def _per_channel(scale: torch.Tensor, x: torch.Tensor, conv: bool) -> torch.Tensor:
    """x scaled per input channel: the last axis of a Linear's input, axis 1 of a conv's."""
    return x * (scale.view(1, -1, *[1] * (x.dim() - 2)) if conv else scale)


def _base_without_bias(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = base.weight.to(x.dtype)
    if isinstance(base, nn.Conv2d):
        return base._conv_forward(x, weight, None)
    return F.linear(x, weight)


class InputAxisDora(LoraVariant):
    """peft's hooks for one layer: forward, merge, unmerge (static, as peft's variants are)."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:  # attach() does it after injection
        attach(module, adapter_name)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        conv = isinstance(module.get_base_layer(), nn.Conv2d)
        scale = column_scale(module, active_adapter)
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        scaled = _per_channel(scale, x, conv)
        extra = _base_without_bias(module.get_base_layer(), _per_channel(scale - 1, x, conv))
        lora = lora_B(lora_A(module.lora_dropout[active_adapter](scaled))) * module.scaling[active_adapter]
        return result + extra.to(result.dtype) + lora.to(result.dtype)

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        scale = column_scale(module, active_adapter).detach()
        module._cache_store(f"{active_adapter}-column_scale", scale)
        delta = _delta(module, active_adapter, torch.float32).detach()
        merged = (orig_weight.float() + delta) * scale.view(1, -1, *[1] * (orig_weight.dim() - 2))
        return merged.to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = InputAxisDora.merge_safe(module, active_adapter, orig_weight.data)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        scale = module._cache_pop(f"{active_adapter}-column_scale")
        delta = _delta(module, active_adapter, torch.float32).detach()
        before = orig_weight.data.float() / scale.view(1, -1, *[1] * (orig_weight.dim() - 2)) - delta
        return before.to(orig_weight.dtype)
