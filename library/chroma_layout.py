"""Chroma transformer weights: diffusers' ChromaTransformer2DModel names <-> the single-file names of the Chroma
checkpoints users have (lodestones' chroma-unlocked / Chroma1-HD files, as ComfyUI and diffusers' from_single_file
read them).

Chroma is FLUX.1 with the per-block modulation Linears, the time / vector / guidance embedders and the final
adaLN removed ("pruned"); all modulations come from one MLP, the approximator (`distilled_guidance_layer`). The
blocks, the embedders and the output projection keep FLUX.1's BFL names, so they go through library.flux_layout;
only the approximator is renamed here: layers.N.linear_1 / linear_2 <-> layers.N.in_layer / out_layer,
norms.N.weight <-> norms.N.scale, in_proj / out_proj unchanged.
"""
from __future__ import annotations

import re

import torch

from library.flux_layout import bfl_to_transformer, transformer_to_bfl

APPROXIMATOR = "distilled_guidance_layer."
# approximator renames (diffusers -> file), inside distilled_guidance_layer.
_OURS_TO_FILE = ((r"layers\.(\d+)\.linear_1\.", r"layers.\1.in_layer."),
                 (r"layers\.(\d+)\.linear_2\.", r"layers.\1.out_layer."),
                 (r"norms\.(\d+)\.weight$", r"norms.\1.scale"))
_FILE_TO_OURS = ((r"layers\.(\d+)\.in_layer\.", r"layers.\1.linear_1."),
                 (r"layers\.(\d+)\.out_layer\.", r"layers.\1.linear_2."),
                 (r"norms\.(\d+)\.scale$", r"norms.\1.weight"))


def _rename_approximator(key: str, rules) -> str:
    rest = key[len(APPROXIMATOR):]
    for pattern, replacement in rules:
        rest = re.sub(pattern, replacement, rest)
    return APPROXIMATOR + rest


def _split(state: dict[str, torch.Tensor]):
    approximator = {k: v for k, v in state.items() if k.startswith(APPROXIMATOR)}
    return approximator, {k: v for k, v in state.items() if not k.startswith(APPROXIMATOR)}


def transformer_to_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ChromaTransformer2DModel state dict in the single-file layout (no "model.diffusion_model." prefix)."""
    approximator, rest = _split(state)
    out = transformer_to_bfl(rest)
    out.update({_rename_approximator(k, _OURS_TO_FILE): v for k, v in approximator.items()})
    return out


def file_to_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of transformer_to_file, at any width; keys with or without "model.diffusion_model."."""
    prefix = "model.diffusion_model."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    approximator, rest = _split(state)
    out = bfl_to_transformer(rest)
    out.update({_rename_approximator(k, _FILE_TO_OURS): v for k, v in approximator.items()})
    return out


def is_chroma_key(key: str) -> bool:
    """True for the approximator's keys, which only Chroma files have (FLUX.1 files have the same blocks)."""
    return key.removeprefix("model.diffusion_model.").startswith(APPROXIMATOR)
