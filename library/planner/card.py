"""The card a plan is for: what it holds besides the allocator's segments (the CUDA context), the cuBLAS
workspace the allocator holds for the compute stream, whether it computes in bf16, and the headroom a
--vram_budget keeps. Read from the present card when there is one (torch.cuda), else the assumptions below.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB, GIB = 2**20, 2**30
# The CUDA context with the kernels of torch, cuBLAS and cuDNN loaded (CUDA's lazy module loading, the default
# since CUDA 11.7 / torch 2.0): what nvidia-smi shows beyond torch.cuda.memory_reserved on an idle process that
# has run a training step. Roughly 0.3-0.6 GiB depending on card and driver; the larger figure is assumed.
CONTEXT = 512 * MIB
# --vram_budget keeps this share of the budget free for what the plan does not model (cuDNN's convolution
# workspaces, which depend on the algorithm cuDNN picks at run time; driver differences; other processes)
MARGIN = 0.05


@dataclass(frozen=True)
class Card:
    name: str = "a CUDA card (assumed: Ampere or newer, 0.5 GiB context)"
    total: int | None = None  # bytes on the card, when known
    context: int = CONTEXT  # bytes held outside the caching allocator
    capability: tuple[int, int] = (8, 6)
    bf16: bool = True

    @property
    def cublas_workspace(self) -> int:
        """The workspace torch gives cuBLAS per (handle, stream) through the caching allocator
        (aten/src/ATen/cuda/CublasHandlePool.cpp, CUBLAS_WORKSPACE_CONFIG unset): 32 MiB on Hopper (sm90)
        and newer, else ':4096:2:16:8' = 2 x 4 MiB + 8 x 16 KiB."""
        return 32 * MIB if self.capability >= (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8


def margin(budget: int) -> int:
    """The bytes of `budget` a --vram_budget answer leaves free."""
    return int(budget * MARGIN)


def present_card() -> Card | None:
    """The current CUDA card as torch sees it (None without one): its total memory and its context, measured
    as what is in use on it beyond this process's allocator (other processes count against it too)."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()
    used_outside = total - free - torch.cuda.memory_reserved()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return Card(name=props.name, total=total, context=max(used_outside, CONTEXT),
                capability=(props.major, props.minor), bf16=torch.cuda.is_bf16_supported())
