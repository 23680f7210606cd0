"""A folder of images with caption files, at one resolution (resize, then center crop).

Layout, as sd-scripts users have it: images directly in `train_data_dir` (repeated `num_repeats`
times), and/or subfolders named `N_name` whose images repeat N times and whose `name` is the
caption of an image with no caption file. A subfolder without the number prefix is skipped and
reported.

train_network.py now uses the full data path (plan.py, training_set.py: dataset TOML, buckets, caption
options, the dataset check, disk caches); this single-resolution one stays for code that still imports it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


from library.data import DatasetError  # noqa: E402  (one class for the old and the new data path)


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int


def scan_folder(root: str | Path, num_repeats: int, caption_extension: str) -> tuple[list[ImageItem], list[str]]:
    """The images under `root` with their captions and repeats, and notes on what was skipped."""
    root = Path(root)
    items = [_item(p, num_repeats, caption_extension, "") for p in _images_in(root)]
    notes = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        match = REPEAT_FOLDER.match(sub.name)
        if not match:
            notes.append(f"skipped folder {sub}: its name does not start with 'N_' (N = repeats)")
            continue
        repeats, class_tokens = int(match.group(1)), match.group(2).strip()
        if repeats < 1:
            notes.append(f"skipped folder {sub}: repeats must be at least 1")
            continue
        images = _images_in(sub)
        if not images:
            notes.append(f"skipped folder {sub}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        items += [_item(p, repeats, caption_extension, class_tokens) for p in images]
    if not items:
        raise DatasetError(f"no training images found in {root}" + "".join(f"\n  {n}" for n in notes))
    return items, notes


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _item(path: Path, repeats: int, caption_extension: str, class_tokens: str) -> ImageItem:
    caption_file = path.with_suffix(caption_extension)
    if caption_file.is_file():
        caption = caption_file.read_text(encoding="utf-8").strip()
    elif class_tokens:
        caption = class_tokens
    else:
        raise DatasetError(f"{path}: no caption file {caption_file.name} and no class tokens from a folder name")
    return ImageItem(path, caption, repeats)


def load_image(path: Path, width: int, height: int) -> torch.Tensor:
    """RGB pixels in [-1, 1], shape (3, height, width): scaled to cover the size, then center-cropped."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = max(width / im.width, height / im.height)
            size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
            im = im.resize(size, Image.Resampling.LANCZOS)
            left, top = (size[0] - width) // 2, (size[1] - height) // 2
            im = im.crop((left, top, left + width, top + height))
            array = np.asarray(im, dtype=np.float32)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read image: {e}") from None
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class ImageCaptionDataset(torch.utils.data.Dataset):
    """One entry per image per repeat. An entry is a dict with pixels (or cached latents) and caption."""

    def __init__(self, items: list[ImageItem], width: int, height: int):
        self.items = items
        self.width, self.height = width, height
        self.index = [i for i, item in enumerate(items) for _ in range(item.repeats)]
        self.latents: list[torch.Tensor] | None = None  # per image, once cache_latents ran
        self.conditioning: dict[str, dict[str, torch.Tensor]] | None = None  # per caption

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        item = self.items[self.index[i]]
        entry = {"caption": item.caption, "image": str(item.path)}
        if self.latents is not None:
            entry["latents"] = self.latents[self.index[i]]
        else:
            entry["pixels"] = load_image(item.path, self.width, self.height)
        return entry

    @property
    def captions(self) -> list[str]:
        return sorted({item.caption for item in self.items})


def collate(entries: list[dict]) -> dict:
    batch = {"caption": [e["caption"] for e in entries], "image": [e["image"] for e in entries]}
    for key in ("pixels", "latents"):
        if key in entries[0]:
            batch[key] = torch.stack([e[key] for e in entries])
    return batch
