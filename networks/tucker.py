"""LoKr's Tucker-factored conv kernel (use_tucker) in the plain low-rank form files carry.

peft (like LyCORIS) trains w2 of a 3x3 conv as a Tucker product: w2[p, q, k, l] = sum_ij a[i, p] t[i, j, k, l] b[j, q]
(a: (r, out), b: (r, in), t: (r, r, kh, kw)). ComfyUI's LoKr adapter evaluates `lokr_t2` with an einsum whose
result is not contiguous and hands it to torch.kron, which fails ("view size is not compatible") and leaves the
layer unpatched. The same w2, exactly, is the rank-r product of `lokr_w2_a` = aᵀ (out, r) and
`lokr_w2_b` = (t ×_j b) flattened to (r, in·kh·kw), the form of a LoKr conv without Tucker, which ComfyUI, Forge,
A1111 and LyCORIS all apply (with the same alpha / r). Files carry that form.

Reading such a file back into a Tucker layer: the rows of lokr_w2_b, as an (r·kh·kw, in) matrix, span at most
r directions of the input; b = an orthonormal basis of them (SVD, zero rows where fewer) and t = that matrix
times bᵀ give back the same w2 (to float rounding), so training continues from the file's exact delta.
"""
from __future__ import annotations

import torch

FILE_KEYS = ("lokr_w2_a", "lokr_w2_b")
TUCKER_KEYS = ("lokr_w2_a", "lokr_w2_b", "lokr_t2")


def to_file(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """(lokr_w2_a, lokr_w2_b) of the plain form from peft's Tucker a (r, out), b (r, in), t (r, r, kh, kw)."""
    rank = t.shape[0]
    product = torch.einsum("i j k l, j q -> i q k l", t, b)  # (r, in, kh, kw)
    return {"lokr_w2_a": a.transpose(0, 1).contiguous(), "lokr_w2_b": product.reshape(rank, -1).contiguous()}


@torch.no_grad()
def from_file(w2_a: torch.Tensor, w2_b: torch.Tensor, t_shape, in_channels: int) -> dict[str, torch.Tensor]:
    """peft's Tucker (lokr_w2_a, lokr_w2_b, lokr_t2) giving the same w2 as the file's plain form."""
    rank, kh, kw = t_shape[0], t_shape[2], t_shape[3]
    product = w2_b.double().reshape(rank, in_channels, kh, kw)
    rows = product.permute(0, 2, 3, 1).reshape(rank * kh * kw, in_channels)  # (i, k, l) x q
    basis = torch.zeros(rank, in_channels, dtype=torch.float64)
    _, _, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = min(rank, vh.shape[0])
    basis[:keep] = vh[:keep]
    core = (rows @ basis.T).reshape(rank, kh, kw, rank).permute(0, 3, 1, 2)  # (i, j, k, l)
    dtype = w2_a.dtype
    return {"lokr_w2_a": w2_a.transpose(0, 1).to(dtype), "lokr_w2_b": basis.to(dtype), "lokr_t2": core.to(dtype)}
