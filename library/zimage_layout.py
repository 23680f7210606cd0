"""The Z-Image transformer's original layout (Tongyi-MAI's checkpoints, ComfyUI's
`diffusion_models/z_image_*.safetensors`, with or without `model.diffusion_model.`) and diffusers'
ZImageTransformer2DModel layout, both ways.

The original fuses each attention's q, k, v into one `attention.qkv` (rows q, then k, then v) and names the output
projection `attention.out`, the q / k norms `q_norm` / `k_norm`, the patch embedder `x_embedder` and the last layer
`final_layer` (diffusers: `all_x_embedder.2-1`, `all_final_layer.2-1`, keyed by patch size 2, frame patch 1).
Everything else (feed_forward.w1/w2/w3, adaLN_modulation, the refiners, cap_embedder, t_embedder, the pad tokens)
has the same name in both.
"""
from __future__ import annotations

import re

import torch

PREFIX = "model.diffusion_model."
QKV = ("to_q", "to_k", "to_v")
# diffusers name part -> original name part (whole dotted components)
RENAMES = {".all_x_embedder.2-1.": ".x_embedder.", ".all_final_layer.2-1.": ".final_layer.",
           ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
           ".attention.norm_k.": ".attention.k_norm."}
BLOCK = r"((?:layers|noise_refiner|context_refiner)\.\d+)"


def is_original_key(key: str) -> bool:
    """A key of the original layout (with or without the ComfyUI prefix) that diffusers' layout does not have."""
    key = key.removeprefix(PREFIX)
    return key.startswith(("x_embedder.", "final_layer.")) or ".attention.qkv." in key


def original_name(module_path: str) -> str:
    """A diffusers module path (or parameter name) in the original naming, q/k/v not fused:
    layers.0.attention.to_out.0 -> layers.0.attention.out."""
    return _renamed(module_path, RENAMES)


def _renamed(name: str, table: dict[str, str]) -> str:
    name = f".{name}."
    for old, new in table.items():
        name = name.replace(old, new)
    return name[1:-1]


def transformer_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ZImageTransformer2DModel state dict in the original layout (q, k, v concatenated into qkv)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(BLOCK + r"\.attention\.(to_q|to_k|to_v)\.weight$", key)
        if m:
            if m.group(2) == "to_q":
                block = m.group(1)
                out[f"{block}.attention.qkv.weight"] = torch.cat(
                    [state[f"{block}.attention.{p}.weight"] for p in QKV], dim=0)
            continue
        out[original_name(key)] = value
    return out


def original_to_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of transformer_to_original; accepts the `model.diffusion_model.` prefix and drops the
    original's `norm_final.weight` where a file has one (diffusers' final norm has no weight)."""
    inverse = {v: k for k, v in RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix(PREFIX)
        if key == "norm_final.weight":
            continue
        m = re.match(BLOCK + r"\.attention\.qkv\.weight$", key)
        if m:
            for part, rows in zip(QKV, value.chunk(3, dim=0)):
                out[f"{m.group(1)}.attention.{part}.weight"] = rows
            continue
        out[_renamed(key, inverse)] = value
    return out


def kohya_layout(module_path: str) -> tuple[str, int, int] | None:
    """AdapterTarget.kohya_layout of the Z-Image transformer: adapter layers named as the original checkpoint names
    them (ComfyUI maps `lora_unet_` + those names): layers.0.attention.to_k -> ("layers.0.attention.qkv", 1, 3),
    layers.0.attention.to_out.0 -> ("layers.0.attention.out", 0, 1), layers.0.feed_forward.w1 -> (the same, 0, 1)."""
    m = re.match(BLOCK + r"\.attention\.(to_q|to_k|to_v)$", module_path)
    if m:
        return f"{m.group(1)}.attention.qkv", QKV.index(m.group(2)), 3
    return original_name(module_path), 0, 1
