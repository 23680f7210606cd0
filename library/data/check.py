"""The dataset check: every image and caption is looked at before any model loads, and every problem is
reported with its path and reason. `dataset.bad_data` says what happens then: "stop" (the default) ends the
run with the whole list, "skip" trains without those files and prints each one as a warning. User files are
only read, never written.

Problems: only files that cannot be used: empty (0-byte) files, files that are not images or do not decode
(corrupt), truncated files (a PNG without its IEND chunk, a JPEG without its end marker, a WEBP shorter than
its RIFF size, or a decode that runs out of data), decompression bombs (more pixels than Pillow's limit),
modes Pillow cannot turn into RGB, images too small for their bucket (enlarged more than 2x), missing /
empty / undecodable captions, empty folders, and duplicate files (the later copies). Valid but unusual images
(16-bit, CMYK, palette with transparency, greyscale) train: library.data.images converts them and the data
summary counts each kind. An EXIF-rotated image is a note, not a problem: it is trained as displayed.

    python -m library.data.check --config my.toml          # a training config, or a dataset TOML
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from library.data.images import CONVERTIBLE_MODES, IMAGE_EXTENSIONS, ImageHeader, read_header

MAX_UPSCALE = 2.0
PNG_END = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class Finding:
    path: Path
    reason: str
    problem: bool = True  # False: a note, the file still trains

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def inspect_image(path: Path, decode: bool) -> tuple[ImageHeader | None, list[Finding]]:
    """The header of an image and what is wrong with it (header None: it cannot be trained at all)."""
    if path.stat().st_size == 0:
        return None, [Finding(path, "empty file (0 bytes)")]
    try:
        header = read_header(path)
    except Image.DecompressionBombError as e:
        return None, [Finding(path, bomb_reason(e))]
    except Exception as e:  # PIL raises several types for a file that is not an image
        cut = "truncat" in str(e).lower() and truncation(path, format_from_magic(path))
        return None, [Finding(path, cut or f"corrupt: not a readable image ({type(e).__name__}: {e})")]
    findings = [Finding(path, reason) for reason in mode_problems(header)]
    end = truncation(path, header.format)
    if end:
        findings.append(Finding(path, end))
    elif decode:
        findings += [Finding(path, reason) for reason in decode_problems(path)]
    if header.orientation != 1:
        findings.append(Finding(path, f"EXIF orientation {header.orientation}: trained as displayed "
                                      f"({header.width}x{header.height})", problem=False))
    return header, findings


def bomb_reason(e: Exception) -> str:
    pixels = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
    return (f"decompression bomb: {size}, more than twice Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
            f"(PIL.Image.MAX_IMAGE_PIXELS); it is not decoded")


def mode_problems(h: ImageHeader) -> list[str]:
    """Only modes that have no RGB conversion; 16-bit, CMYK, palette and greyscale images are converted."""
    if h.mode not in CONVERTIBLE_MODES or h.bit_depth > 16:
        return [f"unsupported mode {h.mode} ({h.bit_depth}-bit; save it as 8-bit RGB)"]
    return []


def truncation(path: Path, image_format: str) -> str | None:
    """Why the file looks cut short, from its last bytes and header (no decoding); None if it does not."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        f.seek(max(0, size - 1024))
        tail = f.read()
    if image_format == "PNG" and not tail.rstrip(b"\0").endswith(PNG_END):
        return "truncated: the PNG has no IEND chunk at its end"
    if image_format == "JPEG" and b"\xff\xd9" not in tail[-64:]:
        return "truncated: the JPEG has no end-of-image marker"
    if image_format == "WEBP" and struct.unpack("<I", head[4:8])[0] + 8 > size:
        return f"truncated: the WEBP is {size} bytes, its header says {struct.unpack('<I', head[4:8])[0] + 8}"
    return None


def format_from_magic(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(12)
    if head.startswith(b"\x89PNG"):
        return "PNG"
    if head.startswith(b"\xff\xd8"):
        return "JPEG"
    return "WEBP" if head[:4] == b"RIFF" and head[8:12] == b"WEBP" else ""


def decode_problems(path: Path) -> list[str]:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        kind = "truncated" if "truncated" in str(e).lower() else "corrupt"
        return [f"{kind}: decoding failed ({type(e).__name__}: {e})"]
    return []


def inspect_all(paths: list[Path], decode: bool, on_done=None) -> list[tuple[ImageHeader | None, list[Finding]]]:
    """inspect_image over many files, in threads (PIL reads and decodes outside the GIL)."""
    workers = min(8, (os.cpu_count() or 1) + 2)
    out = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(lambda p: inspect_image(p, decode), paths, chunksize=64):
            out.append(result)
            if on_done:
                on_done()
    return out


def empty_folder(folder: Path) -> Finding:
    return Finding(folder, f"empty folder: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")


def find_duplicates(paths: list[Path]) -> dict[Path, Path]:
    """Later copy -> first copy, for files with identical bytes (sizes compared first, then SHA-256)."""
    by_size = defaultdict(list)
    for p in paths:
        by_size[p.stat().st_size].append(p)
    first_of: dict[str, Path] = {}
    duplicates = {}
    for group in (g for g in by_size.values() if len(g) > 1):
        for p in group:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest in first_of:
                duplicates[p] = first_of[digest]
            else:
                first_of[digest] = p
    return duplicates


if __name__ == "__main__":  # the command lives in library/data/__main__.py (it reads the data plan, which reads this)
    from library.data.__main__ import check_command

    sys.exit(check_command())
