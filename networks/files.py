"""Adapter files: saving in either layout with `ss_*` / `modelspec.*` metadata, and loading any file
(ours, sd-scripts', LyCORIS', or another kohya-layout export) into the injected adapters to continue
training, after checking that it is for this model family and this algorithm.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open

from library.loading import CheckpointError, read_safetensors_header
from networks import lycoris_format, peft_format
from networks.lycoris_format import LoraFileError
from networks.settings import NetworkSettings
from networks.targets import AdaptedComponent

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("kohya", "peft")


def adapter_tensors(adapted: list[AdaptedComponent], fmt: str, dtype: torch.dtype):
    """(tensors, extra metadata) of the adapters in layout `fmt`."""
    if fmt == "peft":
        return peft_format.state_dict(adapted, dtype)
    return lycoris_format.state_dict(adapted, dtype), {}


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically (library/checkpoint.py): a kill never leaves half a file, a failed write nothing."""
    from library.checkpoint import save_safetensors

    save_safetensors(path, tensors, metadata)


def read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        read_safetensors_header(path)  # an empty, truncated or damaged file is named, not a Rust error
    except CheckpointError as e:
        raise LoraFileError(str(e)) from None
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def load_into(adapted: list[AdaptedComponent], path: str, family_meta: dict[str, str] | None = None) -> int:
    """Load an adapter file of either layout into the injected adapters; returns layers loaded.
    Raises LoraFileError naming the first offending keys, before any weight is copied."""
    tensors, metadata = read(path)
    _check_family(path, metadata, family_meta or {})
    if peft_format.is_peft_layout(tensors.keys(), adapted):
        return peft_format.load_into(adapted, tensors, metadata, str(path))
    return lycoris_format.load_into(adapted, tensors, str(path))


def _check_family(path, metadata: dict[str, str], family_meta: dict[str, str]) -> None:
    key = "ss_base_model_version"
    if key in metadata and key in family_meta and metadata[key] != family_meta[key]:
        raise LoraFileError(f"{path}: made for {metadata[key]} (metadata {key}), this model is "
                            f"{family_meta[key]}")


def network_metadata(s: NetworkSettings) -> dict:
    """The adapter part of the metadata: which module, algorithm and arguments made the file."""
    module = s.module if s.algo in ("lora", "locon") else "lycoris.kohya"
    return {"module": module, "dim": s.dim, "alpha": s.alpha, "args": s.as_args(), "dropout": s.dropout}


def metadata(family_meta: dict[str, str], network: dict, training: dict) -> dict[str, str]:
    """ss_* and modelspec.* metadata. Values must be strings in safetensors metadata."""
    now = time.time()
    meta = {
        "ss_network_module": network["module"],
        "ss_network_dim": str(network["dim"]),
        "ss_network_alpha": str(network["alpha"]),
        "ss_network_args": json.dumps(network["args"]),
        "ss_network_dropout": str(network.get("dropout")),
        "ss_training_started_at": str(training["started_at"]),
        "ss_training_finished_at": str(now),
        "ss_output_name": training["output_name"],
        "ss_learning_rate": str(training["learning_rate"]),
        "ss_unet_lr": str(training["unet_lr"]),
        "ss_text_encoder_lr": str(training["text_encoder_lr"]),
        "ss_steps": str(training["steps"]),
        "ss_epoch": str(training["epoch"]),
        "ss_max_train_steps": str(training["max_train_steps"]),
        "ss_seed": str(training["seed"]),
        "ss_mixed_precision": training["mixed_precision"],
        "ss_clip_skip": str(training["clip_skip"]),
        "ss_num_train_images": str(training["num_images"]),
        "ss_resolution": json.dumps(training["resolution"]),
        "ss_tag_frequency": json.dumps(training["tag_frequency"]),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": training["output_name"],
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.resolution": "x".join(map(str, training["resolution"])),
        "modelspec.prediction_type": training["prediction_type"],
    }
    for key in ("scale_weight_norms", "loraplus_lr_ratio", "save_format"):
        if network.get(key) is not None:
            meta[f"ss_{key}"] = str(network[key])
    for key, value in family_meta.items():
        meta[key] = value + "/lora" if key == "modelspec.architecture" else value
    return meta


# what sd-scripts keeps with no_metadata: the keys a loader needs (and modelspec.*)
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def with_user_metadata(meta: dict[str, str], save) -> dict[str, str]:
    """The [save] section's metadata_* (as modelspec.*) and training_comment (ss_training_comment) added,
    and, with no_metadata, every other ss_* key left out, as sd-scripts writes them."""
    out = {k: v for k, v in meta.items() if not save.no_metadata or k in MINIMUM_KEYS or k.startswith("modelspec.")}
    if save.training_comment is not None and not save.no_metadata:
        out["ss_training_comment"] = save.training_comment
    for name in vars(save):
        value = getattr(save, name)
        if name.startswith("metadata_") and value not in (None, ""):
            out[f"modelspec.{name[len('metadata_'):]}"] = str(value)
    return out
