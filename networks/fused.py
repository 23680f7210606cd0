"""LoRA layers of fused weights: several module paths (q, k, v) whose outputs a checkpoint concatenates into one
weight (FLUX `double_blocks.0.img_attn.qkv`, SD3 `joint_blocks.0.x_block.attn.qkv`, see
AdapterTarget.kohya_layout), written as one file layer and read back into the parts.

Writing n parts of rank r: `lora_down` = the parts' downs stacked along the rank (n·r, in), `lora_up` =
block-diagonal (sum of outs, n·r), `alpha` = n × alpha, so alpha / rank and every part's delta are unchanged.
This is sd-scripts' split_qkv layout; ComfyUI / Forge apply it as one LoRA on the fused weight, and diffusers'
FLUX converter recognises the zero blocks and chunks it back into per-part LoRAs.

Reading: that block-diagonal form, or sd-scripts' default of one down shared by all parts (rank r, in) with
up (sum of outs, r); the latter is exact as rank-r parts that each get the shared down and their rows of up.
Only LoRA / LoCon fuse: LoHa and LoKr deltas are products that no block-diagonal factor pair gives, and DoRA
is kept per part as well (its dora_scale then applies to its part's slice, as ComfyUI applies it); these are
written per part, under names networks/lycoris_format.py gives.
"""
from __future__ import annotations

import torch

FUSABLE = ("lora", "locon")
DOWN, UP = "lora_down.weight", "lora_up.weight"


def fuse(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The file tensors (without alpha) of one layer holding the parts' LoRAs, outputs in part order."""
    ups = [p[UP] for p in parts]
    diagonal = torch.block_diag(*[u.flatten(1) for u in ups])
    return {DOWN: torch.cat([p[DOWN] for p in parts]),
            UP: diagonal.reshape(diagonal.shape[0], diagonal.shape[1], *ups[0].shape[2:])}


def split(parts: dict[str, torch.Tensor], sizes: list[int], rank: int) -> list[dict[str, torch.Tensor]]:
    """The rank-`rank` LoRA of each part (output sizes `sizes`) that a fused file layer holds, each with its
    alpha (same alpha / rank as the file's). ValueError, saying why, where the layer is no such LoRA."""
    if set(parts) - {"alpha"} != {DOWN, UP}:
        raise ValueError(f"holds {sorted(parts)}: only a LoRA of a fused layer can be split into its parts")
    down, up = parts[DOWN], parts[UP]
    file_rank, n = down.shape[0], len(sizes)
    if up.shape[0] != sum(sizes):
        raise ValueError(f"has {up.shape[0]} output rows, the fused layer {sum(sizes)} ({sizes})")
    rows = up.split(sizes)
    if file_rank == rank:  # one down shared by the parts (sd-scripts without split_qkv)
        downs, ups = [down] * n, list(rows)
    elif file_rank == n * rank and _block_diagonal(rows, rank):
        downs, ups = list(down.chunk(n)), [r[:, i * rank:(i + 1) * rank] for i, r in enumerate(rows)]
    else:
        raise ValueError(f"has rank {file_rank}: neither rank-{rank} parts sharing one down nor {n} block-diagonal "
                         f"parts of rank {rank} (the config's network_dim)")
    alpha = float(parts["alpha"]) if "alpha" in parts else float(file_rank)  # kohya: no alpha means rank
    part_alpha = torch.tensor(alpha * rank / file_rank)
    return [{DOWN: d, UP: u, "alpha": part_alpha} for d, u in zip(downs, ups)]


def _block_diagonal(rows: tuple[torch.Tensor, ...], rank: int) -> bool:
    """True if part i's rows of up are zero outside columns i·rank .. (i+1)·rank."""
    for i, r in enumerate(rows):
        outside = torch.cat([r[:, :i * rank], r[:, (i + 1) * rank:]], dim=1)
        if torch.count_nonzero(outside):
            return False
    return True
