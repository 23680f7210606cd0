"""Devices as the run names them: accelerate hands out `cuda` (no index) while tensors report `cuda:0`, and
`torch.device("cuda") != torch.device("cuda:0")`. Every comparison of where a tensor is against where the run
computes goes through `same_device`."""
from __future__ import annotations

import torch


def index_of(device: torch.device | str) -> int:
    """The device's index; for an unindexed accelerator, the current device of its backend (as CUDA does)."""
    device = torch.device(device)
    if device.index is not None:
        return device.index
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    return backend.current_device() if backend is not None and hasattr(backend, "current_device") else 0


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether `a` and `b` are the same device, `cuda` and `cuda:0` included."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.type == "cpu" or index_of(a) == index_of(b))


def on(tensor: torch.Tensor, device: torch.device | str) -> bool:
    return same_device(tensor.device, device)


def enable_tf32() -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and newer; ~8x the fp32 matmul rate, 10-bit
    mantissa inputs, fp32 accumulation), as the peers' trainers run. The CPU's kernels are left alone."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def without_bf16(cfg) -> list[str]:
    """bf16 asked for on a CUDA GPU without native bf16 (before Ampere: T4, V100, RTX 20xx), where it is
    emulated at a fraction of the speed or fails in a kernel: what to ask for instead."""
    t = cfg.train
    if not torch.cuda.is_available() or torch.cuda.is_bf16_supported(including_emulation=False):
        return []
    card = torch.cuda.get_device_name(torch.cuda.current_device())
    return [f"'train.{key}': this GPU ({card}) has no bf16; use {instead}" for key, wanted, instead in (
        ("mixed_precision", t.mixed_precision == "bf16",
         'mixed_precision = "fp16" (with no_half_vae = true for the SDXL VAE) or "no"'),
        ("full_bf16", t.full_bf16, 'full_fp16 = true with mixed_precision = "fp16", or neither')) if wanted]
