"""The tiny dataset: generated images of colored shapes with .txt captions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


COLORS = {"red": (220, 40, 40), "blue": (40, 60, 220), "green": (40, 180, 60), "yellow": (230, 210, 40)}


SHAPES = ("circle", "square")


def make_dataset(folder: str | Path, size: int = 64, seed: int = 0) -> Path:
    """Eight images of a colored shape on a plain background, each with a .txt caption."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 255, 3)))
        draw = ImageDraw.Draw(image)
        lo, hi = int(size * 0.2), int(size * 0.8)
        (draw.ellipse if shape == "circle" else draw.rectangle)([lo, lo, hi, hi], fill=COLORS[color])
        image.save(folder / f"{i:02d}_{color}_{shape}.png")
        (folder / f"{i:02d}_{color}_{shape}.txt").write_text(f"a photo of a {color} {shape}", encoding="utf-8")
    return folder
