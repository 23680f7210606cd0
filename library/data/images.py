"""Image files: listing a folder, reading a header (size, mode, EXIF orientation) without decoding, and
loading the pixels of one training example (resize to cover, crop, flip, alpha mask).

Every mode Pillow reads becomes 8-bit RGB the same way for training and for the check's summary notes
(`conversion`): 16-bit greyscale v -> round(v / 257) (Pillow itself already reduces 16-bit RGB(A) PNGs to their
high byte when it decodes them); CMYK through its embedded ICC profile to sRGB where it has one, else Pillow's
plain formula; a palette with transparency through RGBA; greyscale (L, LA, 1) copied to the three channels.
Alpha is not composited: the color channels train as stored, and alpha_mask reads the alpha channel.

Sizes are (width, height) everywhere in this package except the batch fields original_size,
crop_top_left and target_size, which are (h, w) / (top, left) as SDXL's size conditioning reads them.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
EXIF_ORIENTATION = 0x0112
SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (the order training and caches use)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says. width/height are as displayed, i.e. after the EXIF rotation."""
    width: int
    height: int
    mode: str
    format: str
    orientation: int  # EXIF orientation, 1 = as stored
    has_alpha: bool
    palette_transparency: bool
    bit_depth: int  # bits per channel
    has_icc: bool = False  # an embedded ICC color profile


def read_header(path: Path) -> ImageHeader:
    """The header of an image file; raises OSError (or PIL's UnidentifiedImageError) if it is not one."""
    with Image.open(path) as im:
        orientation = _exif_orientation(im)
        width, height = (im.height, im.width) if orientation in SWAPS_SIDES else im.size
        palette_transparency = im.mode == "PA" or (im.mode == "P" and "transparency" in im.info)
        has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or palette_transparency
        return ImageHeader(width, height, im.mode, im.format or "", orientation, has_alpha,
                           palette_transparency, _bit_depth(path, im), bool(im.info.get("icc_profile")))


def _exif_orientation(im: Image.Image) -> int:
    raw = im.info.get("exif")  # read with the header for JPEG / WEBP / PNG (eXIf before the pixels)
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    value = exif.get(EXIF_ORIENTATION, 1)
    return value if value in range(1, 9) else 1


def _bit_depth(path: Path, im: Image.Image) -> int:
    if im.format == "PNG":  # 16-bit RGB(A) PNGs open as 8-bit modes; the IHDR chunk says the truth
        with open(path, "rb") as f:
            head = f.read(26)
        return head[24] if len(head) == 26 else 8
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return 16 if im.mode.startswith("I;16") else 32
    return 8


# How an image that is not 8-bit RGB(A) becomes RGB: the data summary counts each kind, one line each:
# kind -> (what one image is, what several are, what is done)
CONVERSIONS = {
    "16-bit": ("a 16-bit PNG", "16-bit PNGs", "converted to 8-bit RGB"),
    "cmyk-icc": ("CMYK with an ICC profile", "CMYK with an ICC profile", "converted to sRGB through their profile"),
    "cmyk": ("CMYK without an ICC profile", "CMYK without an ICC profile",
             "converted to RGB without color management"),
    "palette-alpha": ("a palette image with transparency", "palette images with transparency",
                      "converted through RGBA (transparent pixels keep their palette color; alpha_mask reads the "
                      "transparency)"),
    "greyscale": ("greyscale", "greyscale", "converted to RGB (R = G = B)"),
}
CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr",
                     "I", "I;16", "I;16L", "I;16B", "I;16N"}


def conversion(h: ImageHeader) -> str | None:
    """The key in CONVERSIONS of how this image becomes RGB, None for plain 8-bit RGB(A)."""
    if h.bit_depth == 16:
        return "16-bit"
    if h.mode == "CMYK":
        return "cmyk-icc" if h.has_icc else "cmyk"
    if h.palette_transparency:
        return "palette-alpha"
    return "greyscale" if h.mode in ("1", "L", "LA", "La") else None


@dataclass(frozen=True)
class Crop:
    """How an image becomes a training example: scaled to `resized` (w, h), then the `target` (w, h) window
    at (top, left) is cut out."""
    resized: tuple[int, int]
    top: int
    left: int
    target: tuple[int, int]


def plan_crop(size: tuple[int, int], target: tuple[int, int], offset_draw=None) -> Crop:
    """Scale (w, h) `size` to cover `target`, then crop the center, or where `offset_draw(max_left, max_top)`
    says (random_crop)."""
    (w, h), (tw, th) = size, target
    scale = max(tw / w, th / h)
    resized = (max(tw, round(w * scale)), max(th, round(h * scale)))
    free_x, free_y = resized[0] - tw, resized[1] - th
    left, top = offset_draw(free_x, free_y) if offset_draw else (free_x // 2, free_y // 2)
    return Crop(resized, top, left, target)


def open_upright(path: Path, orientation: int) -> Image.Image:
    """The decoded image as displayed (EXIF rotation applied); the file is only read."""
    im = Image.open(path)
    im.load()
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return im


def load_pixels(path: Path, orientation: int, crop: Crop, flip: bool = False, with_mask: bool = False,
                color_shift=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RGB in [-1, 1] (3, H, W) and, with_mask, the alpha channel in [0, 1] (1, H, W) (ones without alpha)."""
    import torch  # here, not above: the dataset check (this module's headers) runs before torch loads
    with open_upright(path, orientation) as im:
        rgb = _resize_crop(to_rgb(im), crop)
        if color_shift is not None:
            rgb = color_shift(rgb)
        mask = None
        if with_mask:
            alpha = im.convert("RGBA").getchannel("A") if _has_alpha(im) else None
            mask = _mask_tensor(alpha, crop)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    if flip:
        pixels = pixels.flip(-1)
        mask = mask.flip(-1) if mask is not None else None
    return pixels, mask


def to_rgb(im: Image.Image) -> Image.Image:
    """The image as 8-bit RGB (see the module docstring for each mode); alpha is dropped, not composited."""
    if im.mode.startswith("I"):  # 16-bit greyscale (I;16*; "I" holds 16-bit PNG values too): v -> round(v / 257)
        values = np.clip(np.asarray(im, dtype=np.float64), 0, 65535)
        return Image.fromarray(np.rint(values / 257).astype(np.uint8), "L").convert("RGB")
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im)
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        from PIL import ImageCms

        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(im, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken or non-CMYK profile: the plain conversion below
    return im.convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info


def _resize_crop(im: Image.Image, crop: Crop) -> Image.Image:
    im = im.resize(crop.resized, Image.Resampling.LANCZOS)
    return im.crop((crop.left, crop.top, crop.left + crop.target[0], crop.top + crop.target[1]))


def _mask_tensor(alpha: Image.Image | None, crop: Crop) -> torch.Tensor:
    import torch

    if alpha is None:
        return torch.ones(1, crop.target[1], crop.target[0])
    array = np.asarray(_resize_crop(alpha, crop), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)
