"""Fine-tune metadata captions: sd-scripts' `metadata_file` (dataset TOML) and `in_json` (training config).

A JSON file maps image keys to {"caption": ..., "tags": ...}; a .jsonl file has one {"image_path", "caption",
"tags"} object a line. A key is an image path, absolute or relative to the subset's image_dir; a key without
an image extension (what sd-scripts' merge_captions_to_metadata writes) names the image of that stem. The
caption is the caption, then caption_separator and the tags where there are tags, as sd-scripts joins them;
an entry with neither has the empty caption.
"""
from __future__ import annotations

import json
from pathlib import Path

from library.data.images import IMAGE_EXTENSIONS


class MetadataError(ValueError):
    """The metadata file cannot be read; the message names the file and why."""


def read_metadata(path: Path, image_dir: Path | None, separator: str) -> tuple[tuple[Path, str], ...]:
    """((image path, caption), ...) in the file's order; an image path may not exist (the data check says so)."""
    entries = _entries(path)
    if not entries:
        raise MetadataError(f"{path}: no image entries")
    out = []
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise MetadataError(f"{path}: the entry of {key!r} must be an object with caption / tags")
        if not Path(key).is_absolute() and image_dir is None:
            raise MetadataError(f"{path}: {key!r} is a relative path: set image_dir")
        out.append((_image_path(key, image_dir), _caption(entry, separator)))
    return tuple(out)


def _entries(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MetadataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".jsonl":
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            return {line["image_path"]: line for line in lines}
        data = json.loads(text)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MetadataError(f"{path}: not valid metadata JSON ({e})") from None
    if not isinstance(data, dict):
        raise MetadataError(f"{path}: must map image keys to {{caption, tags}} objects")
    return data


def _image_path(key: str, image_dir: Path | None) -> Path:
    path = Path(key) if Path(key).is_absolute() else image_dir / key
    if path.suffix.lower() in IMAGE_EXTENSIONS or path.is_file():
        return path
    for ext in sorted(IMAGE_EXTENSIONS):
        for candidate in (path.with_name(path.name + ext), path.with_name(path.name + ext.upper())):
            if candidate.is_file():
                return candidate
    return path


def _caption(entry: dict, separator: str) -> str:
    caption, tags = entry.get("caption") or "", entry.get("tags") or ""
    if tags:
        caption = f"{caption}{separator}{tags}" if caption else tags
    return caption
