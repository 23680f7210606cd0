"""Qwen-Image weights: diffusers' names <-> the names of the split files users have (Comfy-Org's
Qwen-Image_ComfyUI: `diffusion_models/qwen_image_bf16.safetensors`, `text_encoders/qwen_2.5_vl_7b.safetensors`,
`vae/qwen_image_vae.safetensors`).

- The transformer file uses diffusers' own names (diffusers' single-file loader maps it with the identity), with
  or without ComfyUI's `model.diffusion_model.` prefix.
- The text-encoder file is Qwen2.5-VL-7B-Instruct in the layout transformers wrote before 4.52 (`model.layers.N`,
  `model.embed_tokens`, `model.norm`, `visual.*`, `lm_head`); transformers 5 names the language model
  `model.language_model.*` and the vision tower `model.visual.*`. Qwen-Image reads the language model only.
- The VAE file is the Wan-2.1 VAE's original layout (`encoder.downsamples.N.residual.2`, `decoder.upsamples.N`,
  `conv1` / `conv2` for the quant convs), which diffusers' convert_wan_vae_to_diffusers reads; vae_to_file writes it
  (its inverse, for the files a run or the tiny model writes).
"""
from __future__ import annotations

import re

import torch

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# a key only Qwen-Image's transformer has (the RMS norm of the text input; QwenImage 2.1 calls it txt_in.text_norm)
TRANSFORMER_MARK = "txt_norm.weight"
# a key only the Wan-layout VAE file has
VAE_FILE_MARK = "decoder.upsamples.0.residual.0.gamma"


def file_to_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformer file's weights with ComfyUI's prefix (if any) removed."""
    out = {}
    for key, value in state.items():
        for prefix in TRANSFORMER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def is_transformer_key(key: str) -> bool:
    return any(key == p + TRANSFORMER_MARK for p in ("", *TRANSFORMER_PREFIXES))


def text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The language model's weights (Qwen2_5_VLTextModel names) of a Qwen2.5-VL state dict in any layout
    (transformers 5's `model.language_model.*`, the older `model.*` of ComfyUI's file, or the language model's
    own names); the vision tower and lm_head are left out."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            out[key[len("model.language_model."):]] = value
        elif key.startswith("model.") and not key.startswith("model.visual."):
            out[key[len("model."):]] = value
        elif not key.startswith(("model.", "visual.", "lm_head.")):
            out[key] = value  # a language model saved alone (Qwen2_5_VLTextModel's own names)
    return out


def text_model_to_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen2.5-VL model's weights (transformers 5 names) in ComfyUI's text-encoder file layout."""
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.visual."):
            out[key[len("model."):]] = value
        else:
            out[key] = value
    return out


# ---- the VAE: diffusers' AutoencoderKLQwenImage names -> the Wan-2.1 file layout ------------------------------

_RESNET = (("norm1.gamma", "residual.0.gamma"), ("conv1.", "residual.2."), ("norm2.gamma", "residual.3.gamma"),
           ("conv2.", "residual.6."), ("conv_shortcut.", "shortcut."))
_FIXED = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
          "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
          "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
          "decoder.conv_out.": "decoder.head.2."}


def _resnet_part(rest: str) -> str:
    for ours, theirs in _RESNET:
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    return rest


def vae_key_to_file(key: str) -> str:
    """One AutoencoderKLQwenImage key in the Wan-2.1 VAE file layout (what convert_wan_vae_to_diffusers reads)."""
    for ours, theirs in _FIXED.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    found = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.*)", key)
    if found:
        side, kind, index, rest = found.groups()
        if kind == "attentions":
            return f"{side}.middle.1.{rest}"
        return f"{side}.middle.{2 * int(index)}.{_resnet_part(rest)}"
    found = re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key)
    if found:
        return f"encoder.downsamples.{found.group(1)}.{_resnet_part(found.group(2))}"
    found = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key)
    if found:
        block, _, resnet, rest = found.groups()
        index = 4 * int(block) + (int(resnet) if resnet is not None else 3)
        return f"decoder.upsamples.{index}.{_resnet_part(rest)}"
    return key


def vae_to_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {vae_key_to_file(k): v for k, v in state.items()}


def file_to_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VAE file's weights in diffusers' names: the Wan-2.1 layout through diffusers' converter; a file already in
    diffusers' names as it is."""
    if VAE_FILE_MARK not in state:
        return state
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers(state)
