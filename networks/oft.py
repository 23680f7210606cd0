"""OFT and BOFT as LyCORIS trains them and ComfyUI, Forge and LyCORIS apply them: a block-diagonal rotation of
the layer's *output* rows, W' = T W, stored as `oft_blocks`, with `alpha` the norm constraint.

Read from their published sources (LyCORIS lycoris/modules/diag_oft.py and boft.py, ComfyUI
comfy/weight_adapter/oft.py and boft.py):
- Q = B - Bᵀ (skew-symmetric) for the stored blocks B; if alpha > 0 and ||Q|| + 1e-8 > alpha (the norm of all
  blocks at once), Q is scaled to that norm; R = (I + Q)(I - Q)⁻¹ (Cayley), orthogonal.
- OFT: B is (blocks, size, size); row block k of W becomes R_kᵀ W_k (einsum "k n m, k n ... -> k m ...").
- BOFT: B is (m, blocks, size, size); for i = 0 .. m-1 the rows are permuted in butterfly order (groups of
  2 x 2^i x size/2, the two halves interleaved), each row block k becomes R_ik W_k, and the permutation is undone.
- Block sizes follow LyCORIS' rules from network_dim (oft_block_size, boft_block_size), because its loader
  re-derives the layout from the stored block size: OFT blocks no larger than their count; BOFT even blocks,
  a power-of-two count of them and log2(count) + 1 butterfly levels.
ComfyUI reads alpha as the constraint itself; LyCORIS' trainer multiplies its `constraint` by the output size
before writing `alpha = constraint`, so files it trains with a constraint render differently there. Here the
constraint is trained as the UIs apply it (network_args `constraint`, default 0: none).

peft's OFT and BOFT rotate the layer's *input* (W Rᵀ), which no such file expresses, and peft has no option for
the output side; so these two algorithms are this small module of ours, a peft BaseTunerLayer (the rest of
networks/ handles it like any peft layer: parameters, enabling, merging). In forward the rotation is applied to
the layer's output (without its bias), which equals the rotated weight exactly and needs no weight copy.

A layer whose checkpoint stores its rows in another order (SD3's last context modulation: AdapterTarget.kohya_layout
gives it no name) gets no rotation: ComfyUI rotates the checkpoint-order weight and then reorders only the
difference, which is no rotation of ours.
"""
from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from networks.algorithms import ADAPTER

BLOCKS = "oft_blocks"
ALGORITHMS = ("oft", "boft")


def oft_block_size(out_features: int, dim: int) -> int:
    """LyCORIS' OFT block size for network_dim `dim` (its factorization rule, which its loader applies again to
    a file's blocks, so it must hold): min(dim, out / dim) where dim divides the rows, else the largest divisor
    reached going up to dim while below out / divisor (taken as min(d, out / d))."""
    if out_features % dim == 0:
        return min(dim, out_features // dim)
    size = 1
    for d in range(2, min(dim, out_features) + 1):
        if out_features % d == 0:
            size = d
            if d >= out_features // d:
                break
    return min(size, out_features // size)


def boft_block_size(out_features: int, dim: int) -> int:
    """LyCORIS' BOFT block size: even, with out / size a power of two (the butterfly then has log2(out / size) + 1
    levels, as LyCORIS builds and reads it); the largest such size up to dim, else the smallest above it."""
    sizes = [b for b in range(2, out_features + 1, 2)
             if out_features % b == 0 and (out_features // b) & (out_features // b - 1) == 0]
    if not sizes:
        raise ValueError(f"BOFT: {out_features} rows split into no even blocks of a power-of-two count")
    below = [b for b in sizes if b <= dim]
    return below[-1] if below else sizes[0]


def blocks_shape(algo: str, out_features: int, dim: int) -> tuple[int, ...]:
    """oft_blocks' shape: (blocks, size, size) for OFT; (levels, blocks, size, size) for BOFT."""
    if algo == "oft":
        size = oft_block_size(out_features, dim)
        return out_features // size, size, size
    size = boft_block_size(out_features, dim)
    blocks = out_features // size
    return blocks.bit_length(), blocks, size, size


def rotation(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """R = (I + Q)(I - Q)⁻¹ with Q = B - Bᵀ, scaled to norm `constraint` where it is longer (constraint > 0)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        q = torch.where(norm > constraint, q * (constraint / norm), q)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotate_rows(r: torch.Tensor, rows: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """T @ rows for the rotation T of `r` (OFT: (n, b, b); BOFT: (m, n, b, b)); rows: (out, ...)."""
    if r.dim() == 3:
        blocks = rows.unflatten(0, (r.shape[0], r.shape[1]))
        pattern = "k m n, k n ... -> k m ..." if inverse else "k n m, k n ... -> k m ..."
        return torch.einsum(pattern, r, blocks).flatten(0, 1)
    size = r.shape[-1]
    levels = range(r.shape[0] - 1, -1, -1) if inverse else range(r.shape[0])
    for i in levels:
        k = 2 ** i * (size // 2)
        rows = rows.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, size))
        rows = torch.einsum("b j i, b j ... -> b i ..." if inverse else "b i j, b j ... -> b i ...", r[i], rows)
        rows = rows.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return rows


class OutputRotation(nn.Module, BaseTunerLayer):
    """A Linear / Conv2d whose output rows are rotated by OFT / BOFT blocks (trainable, start at zero: T = I)."""

    adapter_layer_names = (BLOCKS,)
    other_param_names = ("constraint",)

    def __init__(self, base_layer: nn.Module, shape: tuple[int, ...], constraint: float, module_dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.oft_blocks = nn.ParameterDict({ADAPTER: nn.Parameter(torch.zeros(shape, device=weight.device))})
        self.constraint = float(constraint)
        self.module_dropout = module_dropout
        self.merged_adapters = []
        self._disable_adapters = False
        self._active_adapter = ADAPTER

    def rotation(self) -> torch.Tensor:
        return rotation(self.oft_blocks[ADAPTER], self.constraint)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return out
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return out
        axis = 1 if isinstance(self.base_layer, nn.Conv2d) else -1
        bias = self.base_layer.bias
        shape = [1] * out.dim()
        shape[axis] = -1
        plain = out - bias.to(out.dtype).view(shape) if bias is not None else out
        rotated = rotate_rows(self.rotation().to(out.dtype), plain.movedim(axis, 0)).movedim(0, axis)
        return rotated + bias.to(out.dtype).view(shape) if bias is not None else rotated

    @torch.no_grad()
    def _rotated_weight(self, inverse: bool = False) -> torch.Tensor:
        weight = self.base_layer.weight
        return rotate_rows(self.rotation().float(), weight.float(), inverse).to(weight.dtype)

    def get_delta_weight(self, adapter: str = ADAPTER) -> torch.Tensor:
        return self._rotated_weight() - self.base_layer.weight

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        if not self.merged:
            self.base_layer.weight.data = self._rotated_weight()
            self.merged_adapters.append(ADAPTER)

    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.data = self._rotated_weight(inverse=True)
            self.merged_adapters.clear()


def keeps_row_order(target, path: str) -> bool:
    """False for a layer whose checkpoint rows are ordered otherwise (see the module docstring)."""
    return not (target.kohya_layout and target.kohya_layout(path) is None)


def inject(module: nn.Module, target, layers: dict[str, tuple[int, float]], settings) -> dict[str, tuple[int, float]]:
    """Wrap each layer of `layers` (whose rows keep their order in checkpoints) in place; returns the wrapped
    layers' (block size, constraint), which files write as (-, alpha)."""
    wrapped = {}
    for path in layers:
        if not keeps_row_order(target, path):
            continue
        base = module.get_submodule(path)
        shape = blocks_shape(settings.algo, base.weight.shape[0], layers[path][0])
        parent, _, child = path.rpartition(".")
        holder = module.get_submodule(parent) if parent else module
        setattr(holder, child, OutputRotation(base, shape, settings.constraint, settings.module_dropout))
        wrapped[path] = (shape[-1], settings.constraint)
    return wrapped
