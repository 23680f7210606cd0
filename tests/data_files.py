"""Tiny image / caption files and configs for the data tests (built in tmp dirs, a few bytes each)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from library.config import config_from_dict

_TINT = itertools.count(1)  # every generated image differs (no accidental duplicates)


def image(path: Path, size=(64, 64), mode="RGB", color=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:  # a gradient, so crops and flips are visible in the pixels
        w, h = size
        x = np.linspace(0, 255, w, dtype=np.uint8)[None, :].repeat(h, 0)
        array = np.stack([x, x[:, ::-1], np.full_like(x, next(_TINT) % 256)], -1)
        im = Image.fromarray(array, "RGB")
        im = im.convert(mode) if mode != "RGB" else im
    else:
        im = Image.new(mode, size, color)
    im.save(path, **save)
    return path


def caption(image_path: Path, text: str | bytes, extension=".txt") -> Path:
    path = image_path.with_suffix(extension)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def config(tmp_path: Path, **dataset):
    raw = {"model": {"pretrained_model_name_or_path": "tiny/model"}, "train": {"output_dir": str(tmp_path / "out")},
           "dataset": {"resolution": 64, **dataset}}
    return config_from_dict(raw, source="test.toml", check_paths=False)


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes: to show a run wrote nothing there."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
