"""Writing weights: every file and folder is written under a temporary name and renamed into place, so a
kill at any moment leaves the previous good file intact and never a half-written one under the real name."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """Tensors (moved to the CPU, floats cast to `dtype` if given) to `path`, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: _for_file(v, dtype) for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _for_file(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def save_folder(path: Path, write) -> Path:
    """`write(tmp_folder)` fills a temporary folder that then replaces `path` (the old one is removed last)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path
