"""Resize a kohya-layout LoRA / LoCon file to a lower rank by SVD, as sd-scripts' networks/resize_lora.py does:

    python -m networks.resize --model in.safetensors --new_rank 4 --out out.safetensors
    python -m networks.resize --model in.safetensors --new_rank 16 --dynamic_method sv_fro --dynamic_param 0.9 ...

Each layer's delta D = (alpha / rank) · up @ down (a conv's kernel folded into down) is factored as U S Vᵀ and
kept at rank k: up = U_k √S_k, down = √S_k V_kᵀ, both divided by √(alpha' / k) with alpha' = alpha · k / rank
(the ratio alpha / rank of the file stays). k is --new_rank, or with --dynamic_method the smallest rank
(at most --new_rank) that keeps: sv_fro, that fraction of D's Frobenius norm; sv_ratio, the singular values
above largest / dynamic_param; sv_cumulative, that fraction of the sum of singular values.

Reported per layer and in total: the retained Frobenius fraction ||D_k|| / ||D|| (what UIs apply of it); by
Eckart-Young the error is sqrt(1 - retained²) of ||D||. Works on any family's file: it needs no model.
DoRA, LoHa, LoKr and OFT layers have no such factorisation: the tool refuses them, naming the key.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from networks import files
from networks.lycoris_format import LoraFileError

DOWN, UP = "lora_down.weight", "lora_up.weight"
METHODS = ("sv_fro", "sv_ratio", "sv_cumulative")


def group_layers(tensors: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """File layer name -> its tensors by suffix; LoraFileError for a layer that is not a plain LoRA."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        layers.setdefault(name, {})[suffix] = value
    for name, parts in layers.items():
        extra = sorted(set(parts) - {DOWN, UP, "alpha"})
        if extra or DOWN not in parts or UP not in parts:
            raise LoraFileError(f"{source}: {name} holds {extra or sorted(parts)}: only LoRA / LoCon layers "
                                f"(lora_down, lora_up, alpha) can be resized by SVD")
    return layers


def layer_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """(alpha / rank) · up @ down as a matrix (out, in·kh·kw), float64."""
    down, up = parts[DOWN].double(), parts[UP].double()
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    return alpha / rank * (up.flatten(1) @ down.flatten(1))


def chosen_rank(s: torch.Tensor, new_rank: int, method: str | None, param: float | None) -> int:
    """The kept rank for singular values `s` (descending)."""
    limit = min(new_rank, int((s > 0).sum()), s.numel())
    if method is None:
        return max(limit, 1)
    if method == "sv_fro":
        energy = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        wanted = int((energy < param ** 2 - 1e-12).sum()) + 1
    elif method == "sv_ratio":
        wanted = int((s >= s[0] / param).sum())
    else:  # sv_cumulative
        wanted = int((torch.cumsum(s, 0) / s.sum() < param - 1e-12).sum()) + 1
    return max(1, min(wanted, limit))


def resize_layer(parts: dict[str, torch.Tensor], new_rank: int, method=None, param=None):
    """(new tensors, retained Frobenius fraction, squared norm of the delta) of one layer."""
    delta = layer_delta(parts)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = chosen_rank(s, new_rank, method, param)
    rank = parts[DOWN].shape[0]
    alpha = (float(parts["alpha"]) if "alpha" in parts else float(rank)) * k / rank
    root = (s[:k] / (alpha / k)).sqrt()
    down, up = root[:, None] * vh[:k], u[:, :k] * root[None, :]
    dtype = parts[DOWN].dtype
    out = {DOWN: down.reshape(k, *parts[DOWN].shape[1:]).to(dtype).contiguous(),
           UP: up.reshape(up.shape[0], k, *parts[UP].shape[2:]).to(dtype).contiguous(),
           "alpha": torch.tensor(alpha, dtype=dtype)}
    total = float((s ** 2).sum())
    return out, math.sqrt(float((s[:k] ** 2).sum()) / total) if total else 1.0, total


def resize(tensors, new_rank: int, method=None, param=None, source: str = "", progress: bool = True):
    """(resized tensors, {layer: (rank, retained)}, overall retained fraction)."""
    out, report, kept, total = {}, {}, 0.0, 0.0
    layers = group_layers(tensors, source)
    for name, parts in tqdm(sorted(layers.items()), desc="resizing", unit="layer", disable=not progress):
        new, retained, energy = resize_layer(parts, new_rank, method, param)
        out.update({f"{name}.{suffix}": value for suffix, value in new.items()})
        report[name] = (new[DOWN].shape[0], retained)
        kept, total = kept + retained ** 2 * energy, total + energy
    return out, report, math.sqrt(kept / total) if total else 1.0


def resized_metadata(metadata: dict[str, str], new_rank: int, method, param, retained: float) -> dict[str, str]:
    meta = dict(metadata)
    dim, alpha = float(meta.get("ss_network_dim", new_rank)), float(meta.get("ss_network_alpha", new_rank))
    meta["ss_network_dim"] = "Dynamic" if method else str(new_rank)
    meta["ss_network_alpha"] = "Dynamic" if method else f"{alpha * new_rank / dim:g}"
    note = f"resized to rank {new_rank}" + (f" ({method} {param})" if method else "") + f", retained {retained:.6f}"
    meta["ss_training_comment"] = (meta.get("ss_training_comment", "") + "; " + note).lstrip("; ")
    meta["lt_resize"] = json.dumps({"new_rank": new_rank, "method": method, "param": param, "retained": retained})
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m networks.resize", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="kohya-layout LoRA / LoCon file to resize")
    p.add_argument("--new_rank", type=int, required=True, help="rank to keep (the most, with --dynamic_method)")
    p.add_argument("--dynamic_method", choices=METHODS)
    p.add_argument("--dynamic_param", type=float, help="sv_fro / sv_cumulative: fraction kept; sv_ratio: ratio")
    p.add_argument("--out", required=True)
    p.add_argument("--precision", choices=tuple(files.SAVE_DTYPES), help="dtype of the output (default: input's)")
    a = p.parse_args(argv)
    if (a.dynamic_method is None) != (a.dynamic_param is None) or a.new_rank < 1:
        p.error("--new_rank >= 1; --dynamic_method and --dynamic_param go together")
    try:
        tensors, metadata = files.read(a.model)
        if a.precision:
            tensors = {k: v.to(files.SAVE_DTYPES[a.precision]) for k, v in tensors.items()}
        out, report, retained = resize(tensors, a.new_rank, a.dynamic_method, a.dynamic_param, a.model)
    except (LoraFileError, OSError) as e:
        print(f"resize error: {e}", file=sys.stderr)
        return 2
    files.save(Path(a.out), out, resized_metadata(metadata, a.new_rank, a.dynamic_method, a.dynamic_param, retained))
    ranks = sorted({r for r, _ in report.values()})
    print(f"{len(report)} layers, ranks {ranks[0]}..{ranks[-1]}, worst layer retained "
          f"{min(x for _, x in report.values()):.6f}, Frobenius retained overall {retained:.6f}; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
