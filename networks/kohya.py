"""The kohya file format, as the rest of the code knew it before the adapter zoo: now in
networks/lycoris_format.py (the layout), networks/files.py (saving, loading, metadata)."""
from __future__ import annotations

from networks import files
from networks.files import SAVE_DTYPES, metadata, save  # noqa: F401
from networks.lycoris_format import LoraFileError, kohya_name, state_dict  # noqa: F401


def load_into(adapted, path: str, family_meta: dict[str, str] | None = None) -> int:
    """Load a kohya / LyCORIS (or peft-layout) file into the injected adapters; returns layers loaded."""
    return files.load_into(adapted, path, family_meta)
