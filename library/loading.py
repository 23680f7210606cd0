"""Reading checkpoints: single files (.safetensors, weights-only .ckpt), shipped architecture configs,
tokenizers from a local folder or the user's cache. Family modules call these; nothing here knows a family.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

ARCH_ROOT = Path(__file__).parent / "arch"


class CheckpointError(Exception):
    """A checkpoint that cannot be read safely or does not match what the config says."""


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint. A pickle (.ckpt) is read weights-only: a file whose
    unpickling would construct arbitrary objects (and could run code) is refused."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: this pickle file contains objects other than tensors, and "
            f"unpickling it could run code. Convert it to .safetensors with a tool you trust. ({e})"
        ) from None
    except RuntimeError as e:  # not a zip/pickle at all
        raise CheckpointError(f"{path}: not a readable checkpoint: {e}") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def has_key_prefix(path: str | Path, prefix: str) -> bool:
    """True if a .safetensors file has a key starting with `prefix` (reads the header only). Pickles are
    not opened here (they are read weights-only when loading): False."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith(prefix) for k in f.keys())


def arch_dir(name_or_path: str) -> Path:
    """A shipped architecture (library/arch/<name>) or a user folder laid out like a diffusers model."""
    shipped = ARCH_ROOT / name_or_path
    if shipped.is_dir():
        return shipped
    path = Path(name_or_path)
    if path.is_dir():
        return path
    names = ", ".join(sorted(p.name for p in ARCH_ROOT.iterdir() if p.is_dir()))
    raise CheckpointError(f"architecture {name_or_path!r}: not a shipped one ({names}) nor a folder")


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def shipped_archs() -> list[Path]:
    return sorted(p for p in ARCH_ROOT.iterdir() if p.is_dir())


def load_clip_tokenizer(where: str, subfolder: str | None = None):
    """A CLIP tokenizer from a local folder, or from the local cache of a hub id (never downloaded)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(where, subfolder=subfolder or "", local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"tokenizer {where!r}{' / ' + subfolder if subfolder else ''} not found locally; set "
            f"model.tokenizer to a folder that holds tokenizer files (or run once with network access "
            f"to fill the cache). ({type(e).__name__})"
        ) from None


# ---- renaming between layouts (the family layout modules' tables drive these) --------------------------


def rename(name: str, table: dict[str, str]) -> str | None:
    """`name` with the first matching prefix of `table` (whole dotted components) replaced, else None."""
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def fuse_parts(state: dict[str, torch.Tensor], prefix: str, fused: dict[str, tuple[str, ...]],
               out_prefix: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The fused weights of one block: for each `fused` name, its parts' weights and biases (under `prefix`)
    concatenated along the output rows, keyed `out_prefix + name`; and the keys of `state` they used."""
    out, used = {}, set()
    for name, parts in fused.items():
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{p}.{suffix}" for p in parts]
            if all(k in state for k in keys):
                out[f"{out_prefix}{name}.{suffix}"] = torch.cat([state[k] for k in keys])
                used.update(keys)
    return out, used
