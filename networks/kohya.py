"""The kohya LoRA file: what ComfyUI, A1111/Forge, diffusers `load_lora_weights` and sd-scripts read.

Key = prefix + "_" + module path with "." replaced by "_", then ".lora_down.weight", ".lora_up.weight"
and ".alpha" (a scalar: the layer's output is scaled by alpha / rank). Metadata values are strings:
`ss_*` (sd-scripts) and `modelspec.*` (the Stability AI model spec).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from networks.lora import AdaptedComponent, copy_weights

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class LoraFileError(Exception):
    """A LoRA file that does not fit the network the config describes; names the offending keys."""


def kohya_name(target, module_path: str) -> str:
    """lora_unet_down_blocks_0_attentions_0_proj_in, lora_te_text_model_encoder_layers_0_mlp_fc1, ..."""
    return f"{target.kohya_prefix}_{(target.kohya_path_prefix + module_path).replace('.', '_')}"


def state_dict(adapted: list[AdaptedComponent], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every adapter weight in kohya naming, on the CPU, in `dtype` (alpha stays exact in that dtype too)."""
    out = {}
    for component in adapted:
        for path, layer in component.lora_layers():
            name = kohya_name(component.target, path)
            _, alpha = component.layers[path]
            out[f"{name}.lora_down.weight"] = _cpu(layer.lora_A["default"].weight, dtype)
            out[f"{name}.lora_up.weight"] = _cpu(layer.lora_B["default"].weight, dtype)
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return out


def _cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).contiguous()


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write atomically: a temporary file renamed over the target, so a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_into(adapted: list[AdaptedComponent], path: str) -> int:
    """Load a kohya file into the injected adapters. Every key of the file must find its layer with the
    same shapes and alpha; layers the file lacks keep their fresh initialisation. Returns layers loaded."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    by_name = {kohya_name(c.target, p): (c, p) for c in adapted for p in c.layers}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        if name not in by_name or suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            bad.append(key)
        else:
            grouped.setdefault(name, {})[suffix] = value
    if bad:
        raise LoraFileError(f"{path}: {len(bad)} key(s) match no layer of this network "
                            f"(another model family, algorithm or target set?): {sorted(bad)[:5]}")
    per_component: dict[int, dict] = {}
    for name, parts in grouped.items():
        component, module_path = by_name[name]
        _check_layer(path, name, parts, component, module_path)
        per_component.setdefault(id(component), {})[module_path] = (parts["lora_down.weight"],
                                                                   parts["lora_up.weight"])
    for component in adapted:
        copy_weights(component, per_component.get(id(component), {}))
    return len(grouped)


def _check_layer(path, name, parts, component: AdaptedComponent, module_path: str) -> None:
    if set(parts) != {"lora_down.weight", "lora_up.weight", "alpha"}:
        raise LoraFileError(f"{path}: {name} lacks {sorted({'lora_down.weight', 'lora_up.weight', 'alpha'} - set(parts))}")
    layer = dict(component.lora_layers())[module_path]
    for suffix, param in (("lora_down.weight", layer.lora_A["default"].weight),
                          ("lora_up.weight", layer.lora_B["default"].weight)):
        if tuple(parts[suffix].shape) != tuple(param.shape):
            raise LoraFileError(f"{path}: {name}.{suffix} has shape {tuple(parts[suffix].shape)}, this network "
                                f"expects {tuple(param.shape)} (network_dim / conv_dim differ?)")
    rank, alpha = component.layers[module_path]
    if abs(float(parts["alpha"]) - alpha) > 1e-3 * max(1.0, abs(alpha)):
        raise LoraFileError(f"{path}: {name}.alpha is {float(parts['alpha']):g}, the config says {alpha:g} "
                            f"(set network_alpha / conv_alpha to the file's values)")


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
    for key, value in family_meta.items():
        meta[key] = value + "/lora" if key == "modelspec.architecture" else value
    return meta
