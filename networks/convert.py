"""Convert an adapter file between our two layouts: kohya / LyCORIS (what ComfyUI, A1111/Forge, sd-scripts read)
and peft / diffusers (`save_format = "peft"`, what diffusers' load_lora_weights and peft read):

    python -m networks.convert --model base_model --network in.safetensors --to peft --out out.safetensors

The adapter is rebuilt on the model (which layers, fused names: the family's) from the file's ss_network_*
metadata, loaded with every key, shape and alpha checked, and written in the other layout; the tensors are
the same numbers (a fused FLUX / SD3 qkv layer split into, or joined from, its parts). Any algorithm. For
single-file models pass the separate files / arch / tokenizer as for training.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from networks import files
from networks.lycoris_format import LoraFileError

SEPARATE = ("tokenizer", "arch", "vae", "clip_l", "clip_g", "t5xxl", "ae")


def _arguments(argv):
    p = argparse.ArgumentParser(prog="python -m networks.convert", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="the base model the adapter is for (file or folder)")
    p.add_argument("--network", required=True, help="the adapter file")
    p.add_argument("--to", required=True, choices=files.FORMATS, help="the layout to write")
    p.add_argument("--out", required=True)
    for name in SEPARATE:
        p.add_argument(f"--{name}", help=f"as model.{name}, for single files")
    return p.parse_args(argv)


def convert(family, parts, path: str, to: str):
    """(tensors, metadata) of the adapter file at `path` in layout `to`."""
    from networks.merge import components_in_file, settings_of
    from networks.targets import inject

    tensors, metadata = files.read(path)
    if "ss_network_dim" not in metadata or "ss_network_alpha" not in metadata:
        raise LoraFileError(f"{path}: no ss_network_dim / ss_network_alpha metadata to rebuild the adapter from")
    settings = settings_of(metadata)
    targets = family.adapter_targets(parts)
    touched = components_in_file(targets, tensors.keys())
    adapted = [inject(parts.denoiser if t.component == "denoiser" else parts.text_encoders[t.component], t, settings)
               for t in targets if t.component in touched]
    files.load_into(adapted, path)
    dtype = next(iter(tensors.values())).dtype
    out, extra = files.adapter_tensors(adapted, to, dtype)
    kept = {k: v for k, v in metadata.items() if k != "lt_peft_layers"}
    return out, {**kept, **extra, "ss_save_format": to}


def main(argv: list[str] | None = None) -> int:
    a = _arguments(argv)
    from library.families import ModelSource, get_family
    from library.loading import CheckpointError
    from networks.settings import SettingsError

    try:
        family = get_family("auto", a.model)
        parts = family.load(ModelSource(a.model, **{name: getattr(a, name) for name in SEPARATE}))
        tensors, metadata = convert(family, parts, a.network, a.to)
    except (LoraFileError, CheckpointError, SettingsError, OSError, KeyError, ValueError) as e:
        print(f"convert error: {e}", file=sys.stderr)
        return 2
    files.save(Path(a.out), tensors, metadata)
    print(f"{len(tensors)} tensors in {a.to} layout; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
