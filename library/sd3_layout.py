"""SD3 / SD3.5 transformer weights: diffusers' SD3Transformer2DModel names <-> the SAI single-file names
(sd3_medium.safetensors, sd3.5_large.safetensors: `model.diffusion_model.joint_blocks.N.x_block.attn.qkv`, ...)
that ComfyUI, Forge, sd-scripts and diffusers' from_single_file read.

diffusers has the SAI -> diffusers direction (convert_sd3_transformer_checkpoint_to_diffusers); a test checks that
transformer_to_sai is its inverse. The SAI file fuses q, k, v of each attention into one `qkv` Linear, and the
modulations of the final layer and of the last block's context stream (both AdaLayerNormContinuous in diffusers)
are (shift, scale) where diffusers has (scale, shift).

sai_module_name / kohya_layout give the SAI name of a diffusers module path for adapter files: sd-scripts'
networks/lora_sd3.py names its layers by the SAI modules (lora_unet_joint_blocks_0_x_block_attn_qkv, fused q, k, v).
"""
from __future__ import annotations

import re

import torch

from library.loading import fuse_parts, rename

SAI_PREFIX = "model.diffusion_model."
# one-to-one renames inside joint_blocks.N / transformer_blocks.N (diffusers -> SAI)
BLOCK = {"norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
         "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
         "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
         "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
         "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k",
         "attn2.to_out.0": "x_block.attn2.proj",
         "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
         "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2"}
# fused layers: SAI name -> the diffusers layers concatenated along the output dimension, in order
FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}
TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder",
       "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
       "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
       "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
       "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
       "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}


def _swap_halves(value: torch.Tensor) -> torch.Tensor:
    first, second = value.chunk(2, dim=0)
    return torch.cat([second, first])


def transformer_to_sai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in the SAI layout (keys without "model.diffusion_model.")."""
    out: dict[str, torch.Tensor] = {}
    indices = sorted({int(m.group(1)) for k in state for m in [re.match(r"transformer_blocks\.(\d+)\.", k)] if m})
    last = indices[-1] if indices else -1
    for i in indices:
        pre, sai = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        tensors, fused_parts = fuse_parts(state, pre, FUSED, sai)
        out.update(tensors)
        for key in [k for k in state if k.startswith(pre) and k not in fused_parts]:
            rest = key[len(pre):]
            new = rename(rest, BLOCK)
            if new is None:
                raise KeyError(f"no SAI name for {key}")
            value = state[key]
            if i == last and rest.startswith("norm1_context.linear."):  # context_pre_only: AdaLayerNormContinuous
                value = _swap_halves(value)
            out[sai + new] = value
    for key, value in state.items():
        if key.startswith("transformer_blocks."):
            continue
        if key == "pos_embed.pos_embed":
            out["pos_embed"] = value
            continue
        new = rename(key, TOP)
        if new is None:
            raise KeyError(f"no SAI name for {key}")
        out[new] = _swap_halves(value) if key.startswith("norm_out.linear.") else value
    return out


def sai_to_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SAI transformer keys of `state` (with or without "model.diffusion_model."; other keys ignored) in
    diffusers' names, by diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    mine = {k[len(SAI_PREFIX):] if k.startswith(SAI_PREFIX) else k: v for k, v in state.items()
            if not k.startswith(("text_encoders.", "first_stage_model."))}
    return convert_sd3_transformer_checkpoint_to_diffusers(mine)


def kohya_layout(module_path: str, num_layers: int | None = None) -> tuple[str, int, int] | None:
    """The SAI name of the layer a diffusers module path belongs to, its position among the layers fused there
    and their number: transformer_blocks.0.attn.to_k -> ("joint_blocks.0.x_block.attn.qkv", 1, 3),
    transformer_blocks.0.ff.net.2 -> ("joint_blocks.0.x_block.mlp.fc2", 0, 1). None where the SAI layer is not a
    plain concatenation of ours: the last block's context modulation (given num_layers; its rows are (shift,
    scale) in the SAI file, (scale, shift) here), and modules outside the joint blocks."""
    m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", module_path)
    if not m:
        return None
    index, rest = m.groups()
    if rest == "norm1_context.linear" and num_layers is not None and int(index) == num_layers - 1:
        return None
    for name, parts in FUSED.items():
        if rest in parts:
            return f"joint_blocks.{index}.{name}", parts.index(rest), len(parts)
    new = BLOCK.get(rest)
    return (f"joint_blocks.{index}.{new}", 0, 1) if new else None


def sai_module_name(module_path: str, num_layers: int | None = None) -> str | None:
    """The SAI / sd-scripts module name of a diffusers module path (a q, k or v projection maps to its fused
    qkv); None where there is none or where the SAI weight is a row permutation of ours (the last block's
    context modulation, given num_layers, and norm_out.linear)."""
    if module_path.startswith("transformer_blocks."):
        layout = kohya_layout(module_path, num_layers)
        return layout[0] if layout else None
    return None if module_path == "norm_out.linear" else rename(module_path, TOP)
