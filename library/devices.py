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
