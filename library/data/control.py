"""Control (reference) images of edit pairs (FLUX.1 Kontext): each training image's control image is the file with
its stem in the subset's control_directory, resized to cover the image's bucket and center-cropped to it (as
musubi-tuner and ai-toolkit pair them), flipped with the image."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from library.data.images import list_images, load_pixels, plan_crop, read_header
from library.data.plan import ImageRecord

if TYPE_CHECKING:  # torch loads later: the dataset check imports this module's neighbours without it
    import torch


def control_path(record: ImageRecord) -> Path:
    """The control image of `record`: the file with its stem in the subset's control_directory."""
    found = [p for p in list_images(record.subset.control_dir) if p.stem == record.path.stem]
    if not found:
        raise FileNotFoundError(f"{record.path}: no control image {record.path.stem}.* in "
                                f"{record.subset.control_dir} ({record.subset.where}.control_directory)")
    return found[0]


def control_pixels(record: ImageRecord, flip: bool) -> torch.Tensor:
    """The control image of `record` at its bucket: resized to cover it, center-cropped, flipped with the image."""
    path = control_path(record)
    header = read_header(path)
    return load_pixels(path, header.orientation, plan_crop((header.width, header.height), record.bucket), flip)[0]
