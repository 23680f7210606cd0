"""Tiny image / caption files and configs for the data tests (built in tmp dirs, a few bytes each)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

from library.config_files import config_from_dict

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


def png_16bit(path: Path, values: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (Pillow writes 16-bit greyscale only): values (h, w) grey or (h, w, 3) RGB."""
    import struct
    import zlib

    h, w = values.shape[:2]
    color_type = 2 if values.ndim == 3 else 0
    rows = values.astype(">u2").reshape(h, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def cmyk_profile_k_only() -> bytes:
    """An ICC v2 CMYK profile whose A2B0 table maps every color to grey Lab (100 (1 - K), 0, 0): C, M and Y are
    ignored, so a profile-converted pixel depends on K alone (and differs from the plain CMYK formula)."""
    import struct

    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    grid = []  # 2 points per input channel, C outermost, K innermost; lut16 Lab: L 0..100 -> 0..0xFF00
    for index in range(16):
        k = index & 1
        grid += [0xFF00 * (1 - k), 0x8000, 0x8000]
    a2b0 = (b"mft2" + bytes(4) + bytes([4, 3, 2, 0]) + b"".join(s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
            + struct.pack(">HH", 2, 2) + struct.pack(">8H", *[0, 65535] * 4) + struct.pack(">48H", *grid)
            + struct.pack(">6H", *[0, 65535] * 3))
    text = b"k-only test profile\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    wtpt = b"XYZ " + bytes(4) + s15(0.9642) + s15(1.0) + s15(0.8249)
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", a2b0)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"prtrCMYKLab "
              + bytes(12) + b"acsp" + bytes(24) + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249)
              + bytes(4))
    header += bytes(128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def lab_grey_to_srgb(lightness: np.ndarray) -> np.ndarray:
    """8-bit sRGB value of the grey of CIE lightness L* (0..100): CIE L* -> Y, then the sRGB transfer curve."""
    f = (lightness + 16) / 116
    y = np.where(lightness > 8, f ** 3, lightness / 903.3)
    srgb = np.where(y <= 0.0031308, 12.92 * y, 1.055 * np.power(y, 1 / 2.4) - 0.055)
    return np.rint(np.clip(srgb, 0, 1) * 255)
