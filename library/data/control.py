"""Control (reference) images of edit pairs (FLUX.1 Kontext): each training image's control image is the file with
its stem in the subset's control_directory, resized to cover the image's bucket and center-cropped to it (as
musubi-tuner and ai-toolkit pair them), flipped with the image."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from library.data.images import list_images, load_pixels, plan_crop, read_header
if TYPE_CHECKING:  # torch loads later: the dataset check (library.data.plan) imports this module without it
    import torch

    from library.data.plan import ImageRecord


def find_control(control_dir: Path, image: Path) -> Path | None:
    """The image file with the stem of `image` in `control_dir`; None if there is none."""
    return next((p for p in list_images(control_dir) if p.stem == image.stem), None)


def missing_control(control_dir: Path, image: Path) -> str:
    """The dataset check's finding about an image without its control image."""
    return f"no control image {image.stem}.* in {control_dir} (control_directory)"


def control_path(record: ImageRecord) -> Path:
    """The control image of `record` (the dataset check has made sure there is one)."""
    found = find_control(record.subset.control_dir, record.path)
    if found is None:
        raise FileNotFoundError(f"{record.path}: {missing_control(record.subset.control_dir, record.path)}")
    return found


def control_pixels(record: ImageRecord, flip: bool) -> torch.Tensor:
    """The control image of `record` at its bucket: resized to cover it, center-cropped, flipped with the image."""
    path = control_path(record)
    header = read_header(path)
    return load_pixels(path, header.orientation, plan_crop((header.width, header.height), record.bucket), flip)[0]
