"""bitsandbytes' quantized layers (model.base_model_precision, and model.t5xxl_precision = int8 / nf4 for the
text encoder) as the planner runs them: bitsandbytes' kernels
do not run on fake tensors, so each quantized Linear is a stand-in holding the storages bitsandbytes holds for
it, byte for byte, and computing as bitsandbytes does in training, with the same transient tensors:

- int8 (LLM.int8): int8 weights of the layer's shape + one fp32 scale per output row (weight.SCB; state.CB is
  the same storage as the weights). Forward casts its input to fp16; backward makes an fp16 copy of the
  weights (CB x SCB / 127) for the input's gradient. Nothing is saved for backward but the layer itself.
- nf4 (QLoRA, double quantization): two 4-bit codes a byte, one 8-bit absmax per block of 64 weights, one fp32
  absmax per 256 of those blocks, the two code tables (16 and 256 fp32) and an fp32 offset. Forward and
  backward each dequantize the whole weight to the compute dtype, transiently.

fp32 quant state is held in int32 storages of the same size (the values of a plan are never read, and the
recipes' casts of frozen floating tensors then leave it as bitsandbytes' is left).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NF4_BLOCK, NF4_ABSMAX_BLOCK = 64, 256  # bitsandbytes' quantize_4bit blocksize, and that of the absmax's own
NF4_TABLES = 16 + 256 + 1  # fp32 values: the NF4 code, the absmax's dynamic code, the absmax offset


def planned_linear(child: nn.Linear, precision: str, compute_dtype: torch.dtype) -> nn.Module:
    """The planner's make_layer for library.quantization.quantize_base."""
    return PlannedQuantLinear(child, precision, compute_dtype)


def store_text_encoders(parts, precision: str, mixed_precision: str) -> list[str]:
    """model.t5xxl_precision = int8 / nf4 as a run stores the text encoders (library.quantization.store_t5),
    with the stand-in layers; returns the plan's note."""
    from library.memory import weight_dtype
    from library.quantization import store_t5

    if precision not in ("int8", "nf4"):
        return []
    names = store_t5(parts, precision, weight_dtype(mixed_precision), make_layer=planned_linear)
    return [f"t5xxl_precision {precision}: bitsandbytes' storage of {', '.join(names)}'s Linears while encoding"]


def quantized_bytes(out_features: int, in_features: int, precision: str) -> int:
    """Bytes bitsandbytes keeps for the weights of one out x in Linear (not its bias)."""
    n = out_features * in_features
    if precision == "int8":
        return n + 4 * out_features
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // NF4_ABSMAX_BLOCK) + 4 * NF4_TABLES


class PlannedQuantLinear(nn.Linear):
    """A Linear (peft puts its LoRA layers on it as on any Linear) whose storages are bitsandbytes' for
    `precision` (module docstring)."""

    def __init__(self, child: nn.Linear, precision: str, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features = child.in_features, child.out_features
        self.precision = precision
        # bitsandbytes computes LLM.int8 in fp16; nf4 dequantizes to the compute dtype
        self.dequantized_dtype = torch.float16 if precision == "int8" else compute_dtype
        device, n, out = child.weight.device, child.weight.numel(), child.out_features
        if precision == "int8":
            self.weight = nn.Parameter(torch.empty(child.weight.shape, dtype=torch.int8, device=device),
                                       requires_grad=False)
            self.register_buffer("row_scales", torch.empty(out, dtype=torch.int32, device=device))
        else:
            blocks = -(-n // NF4_BLOCK)
            self.weight = nn.Parameter(torch.empty((-(-n // 2), 1), dtype=torch.uint8, device=device),
                                       requires_grad=False)
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax_scales", torch.empty(-(-blocks // NF4_ABSMAX_BLOCK), dtype=torch.int32,
                                                              device=device))
            self.register_buffer("code_tables", torch.empty(NF4_TABLES, dtype=torch.int32, device=device))
        self.bias = child.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Dequantized.apply(x, self.weight, (self.out_features, self.in_features), self.dequantized_dtype,
                                  self.bias)


class _Dequantized(torch.autograd.Function):
    """y = x W^T + b with W dequantized for the product only, in forward and again in backward (bitsandbytes'
    MatMul4Bit / MatMul8bitLt save the quantized layer, not the dequantized weight)."""

    @staticmethod
    def forward(ctx, x, weight, shape, dtype, bias):  # noqa: ARG004  (weight: the quantized storage)
        ctx.shape, ctx.dtype, ctx.input_dtype = shape, dtype, x.dtype
        dequantized = torch.zeros(shape, dtype=dtype, device=x.device)
        out = F.linear(x.to(dtype), dequantized, None if bias is None else bias.to(dtype))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        dequantized = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)
        return (grad.to(ctx.dtype) @ dequantized).to(ctx.input_dtype), None, None, None, None
