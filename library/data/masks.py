"""Mask images of sd-scripts' masked_loss: each training image's mask is the image with its stem in the subset's
conditioning_data_dir, of the same size; its red channel (0..255 -> 0..1) weights the loss of each pixel, cropped,
resized and flipped as the image is (sd-scripts' apply_masked_loss reads the red channel the same way)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from library.data.images import Crop, _mask_tensor, list_images, open_upright, read_header

if TYPE_CHECKING:  # torch loads later: the dataset check imports this module without it
    import torch

    from library.data.plan import ImageRecord


def find_mask(mask_dir: Path, image: Path) -> Path | None:
    """The image file with the stem of `image` in `mask_dir`; None if there is none."""
    return next((p for p in list_images(mask_dir) if p.stem == image.stem), None)


def mask_problem(mask_dir: Path, image: Path, size: tuple[int, int]) -> str | None:
    """The dataset check's finding about an image's mask (missing, or not the image's size); None if it fits."""
    found = find_mask(mask_dir, image)
    if found is None:
        return f"no mask image {image.stem}.* in {mask_dir} (conditioning_data_dir)"
    header = read_header(found)
    if (header.width, header.height) != size:
        return (f"mask image {found.name} is {header.width}x{header.height}, the image {size[0]}x{size[1]}: "
                f"a mask must have its image's size")
    return None


def load_mask(record: ImageRecord, crop: Crop, flip: bool) -> torch.Tensor:
    """(1, H, W) in [0, 1]: the red channel of the record's mask image, cropped and resized as the image."""
    path = find_mask(record.subset.mask_dir, record.path)
    if path is None:
        raise FileNotFoundError(f"{record.path}: no mask image in {record.subset.mask_dir}")
    with open_upright(path, read_header(path).orientation) as im:
        mask = _mask_tensor(im.convert("RGB").getchannel("R"), crop)
    return mask.flip(-1) if flip else mask
