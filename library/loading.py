"""Reading checkpoints: single files (.safetensors, weights-only .ckpt), shipped architecture configs,
tokenizers from a local folder or the user's cache (or fetched once from the family's known repo when the
network is allowed). Family modules call these; nothing here knows a family.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch  # imported where tensors are made: reading a header (the checks before loading) needs no torch

ARCH_ROOT = Path(__file__).parent / "arch"


class CheckpointError(Exception):
    """A checkpoint that cannot be read safely or does not match what the config says; `key` is the config key
    that named the file, where the raiser knows it (else the message names the file)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class TensorInfo(NamedTuple):
    """A tensor as a .safetensors header describes it (detect_arch functions read `.shape` from these too)."""
    dtype: str
    shape: tuple[int, ...]


class SafetensorsHeader(NamedTuple):
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The tensor names, dtypes and shapes and the metadata of a .safetensors file, from its header alone (a few
    kB read); CheckpointError saying what is wrong if the file is empty, not a .safetensors file, or cut short."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        if size < 8:
            raise CheckpointError(f"{path} is {'empty' if size == 0 else 'too short'} ({size} bytes): not a "
                                  f".safetensors file")
        length = struct.unpack("<Q", head[:8])[0]
        if head[8:9] != b"{" or length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path} is not a .safetensors file (its header does not start with a length "
                                  f"and a JSON object; another format renamed?)")
        if 8 + length > size:
            raise CheckpointError(f"{path} is truncated (its header alone says {8 + length} bytes, file has {size})")
        f.seek(0)
        raw = f.read(8 + length)[8:]
    try:
        header = json.loads(raw)
        metadata = header.pop("__metadata__", None) or {}
        tensors = {k: TensorInfo(v["dtype"], tuple(v["shape"])) for k, v in header.items()}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path} has a damaged header (not the JSON a .safetensors file holds: "
                              f"{type(e).__name__})") from None
    expected = 8 + length + end
    if size < expected:
        raise CheckpointError(f"{path} is truncated (header says {expected} bytes, file has {size})")
    if size > expected:
        raise CheckpointError(f"{path} is damaged: {size - expected} bytes more than its header says ({expected})")
    return SafetensorsHeader(tensors, metadata)


def pickle_problem(path: str | Path) -> str | None:
    """Why a torch pickle checkpoint (.ckpt / .pt / .pth / .bin) cannot be read, from its first bytes; None if it
    looks like one (zip-format torch.save, or the legacy pickle format)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        return f"{path} is empty (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return None if zipfile.is_zipfile(path) else f"{path} is truncated (a zip-format torch checkpoint without " \
                                                     f"its end: {size} bytes)"
    if head[:1] == b"\x80":  # the pickle PROTO opcode: torch.save's legacy (non-zip) format
        return None
    return f"{path} is not a torch checkpoint (neither the zip format nor a pickle; another format renamed?)"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file checkpoint. A pickle (.ckpt) is read weights-only: a file whose
    unpickling would construct arbitrary objects (and could run code) is refused."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        header = read_safetensors_header(path)  # a damaged file is named, not a Rust error
        return _dequantized(load_file(str(path)), header.metadata, path)
    problem = pickle_problem(path)
    if problem:
        raise CheckpointError(problem)
    try:  # mmap needs the zip format; a legacy (non-zip) torch.save file is read into memory, weights-only too
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        found = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: refused to load: this pickle file contains objects other than tensors, and "
            f"unpickling it could run code ({_unsafe_global(found)}); convert it to .safetensors with a tool you "
            f"trust") from None
    except (RuntimeError, EOFError, ValueError) as e:  # a damaged zip or pickle
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no details'})") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return _dequantized({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, {}, path)


def _dequantized(state: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8-scaled weights as the weights they stand for (library.fp8_scaled); other files as read."""
    from library.fp8_scaled import ScaledFp8Error, dequantize

    try:
        return dequantize(state, metadata)
    except ScaledFp8Error as e:
        raise CheckpointError(f"{path}: {e}") from None


def _unsafe_global(lines: list[str]) -> str:
    """What the pickle wanted to construct, from torch's weights-only refusal."""
    for line in lines:
        found = re.search(r"GLOBAL ([\w.]+)", line)
        if found:
            return f"it constructs {found.group(1)}"
    return next((line.strip() for line in lines if line.strip()), "no details")


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


def load_clip_tokenizer(where: str, subfolder: str | tuple[str, ...] | None = None,
                        fetch: tuple[str, str] | None = None):
    """A CLIP tokenizer (load_tokenizer): from `where` (its `subfolder`, or the first of several holding one), the
    cache, or fetched from `fetch`."""
    from transformers import CLIPTokenizer

    subfolders = subfolder if isinstance(subfolder, tuple) else (subfolder or "",)
    return load_tokenizer(where, subfolders, fetch or (where, subfolders[0]), "CLIP", CLIPTokenizer)


TOKENIZER_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")  # what a tokenizer folder holds


def load_tokenizer(where: str, subfolders: tuple[str, ...], fetch: tuple[str, str], what: str, cls=None):
    """The `what` tokenizer (a transformers `cls`, AutoTokenizer by default): from `where` (a folder, or the local
    Hugging Face cache of a hub id), in the first of its `subfolders` holding one ("": `where` itself); else
    from the cache of the family's known repo and subfolder `fetch`; else downloaded once into that cache with
    huggingface_hub (from `where` when it is a hub id, else from `fetch`), unless HF_HUB_OFFLINE /
    TRANSFORMERS_OFFLINE says not to. If none of that gives one: CheckpointError (model.tokenizer) naming the
    tokenizer, where it was looked for, and how to provide it."""
    if cls is None:
        from transformers import AutoTokenizer as cls
    repo, repo_subfolder = fetch
    found = _local_tokenizer(cls, where, subfolders) or _local_tokenizer(cls, repo, (repo_subfolder,))
    if found is not None:
        return found
    source, wanted = (where, subfolders) if _looks_like_hub_id(where) else (repo, (repo_subfolder,))
    why = _offline()
    if why is None:
        try:
            from huggingface_hub import snapshot_download

            patterns = [f"{sub}/*" if sub else name for sub in wanted for name in TOKENIZER_FILES]
            found = _local_tokenizer(cls, snapshot_download(source, allow_patterns=patterns), wanted)
            why = None if found is not None else f"{source} has no {what} tokenizer files there"
        except Exception as e:  # noqa: BLE001  (huggingface_hub's network, gating and missing-repo errors)
            why = f"downloading it from {source} failed ({type(e).__name__}: {_first_line(e)})"
    if found is not None:
        return found
    inside = " or ".join(f"{where}/{sub}" if sub else where for sub in subfolders)
    raise CheckpointError(
        f"{what} tokenizer not found in {inside} nor in the Hugging Face cache of {repo}, and {why}: set "
        f"model.tokenizer to a folder holding its files, or fetch them once with network access (huggingface-cli "
        f"download {repo} --include '{repo_subfolder + '/' if repo_subfolder else ''}*'; a gated repo needs "
        f"HF_TOKEN)", key="model.tokenizer")


def _local_tokenizer(cls, where: str, subfolders: tuple[str, ...]):
    """The tokenizer in the first of `subfolders` of `where` (or its cache) that has one, else None. transformers'
    CLIPTokenizer "loads" from a folder without its files as a tokenizer of its 2 special tokens: not one."""
    for subfolder in subfolders:
        try:
            tokenizer = cls.from_pretrained(where, subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError, TypeError):
            continue
        if len(tokenizer) > len(set(tokenizer.all_special_tokens)):
            return tokenizer
    return None


def _looks_like_hub_id(value: str) -> bool:
    return not os.path.exists(value) and re.fullmatch(r"[\w.-]+/[\w.-]+", value) is not None


def _offline() -> str | None:
    """Why nothing is downloaded (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set (no download)"
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no details"


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
    import torch

    out, used = {}, set()
    for name, parts in fused.items():
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{p}.{suffix}" for p in parts]
            if all(k in state for k in keys):
                out[f"{out_prefix}{name}.{suffix}"] = torch.cat([state[k] for k in keys])
                used.update(keys)
    return out, used


def arch_problem(detect_arch, tensors) -> str | None:
    """Why `detect_arch` (a U-Net family's shipped-architecture lookup) finds none for these tensors, or None."""
    try:
        detect_arch(tensors)
    except (CheckpointError, KeyError, StopIteration, IndexError) as e:
        return str(e) if isinstance(e, CheckpointError) else "no U-Net input convolution or cross-attention"
    return None
