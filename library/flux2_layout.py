"""FLUX.2 transformer weights: diffusers' Flux2Transformer2DModel names <-> the BFL single-file names of the FLUX.2
files users have (flux-2-klein-4b.safetensors, flux2-dev.safetensors, ComfyUI's split diffusion_models/ files):
double_blocks.N.img_attn.qkv, single_blocks.N.linear1, double_stream_modulation_img.lin, ...

File -> diffusers is diffusers' own converter (convert_flux2_transformer_checkpoint_to_diffusers); diffusers ->
file is written here and tested as its inverse. The double blocks fuse q, k, v into one Linear (img_attn.qkv,
txt_attn.qkv); the single blocks' q, k, v and MLP input are already one Linear in diffusers (to_qkv_mlp_proj =
linear1). The modulations are shared by all blocks of a kind (top-level), and the final adaLN is (shift, scale)
in the file where diffusers' norm_out is (scale, shift).
"""
from __future__ import annotations

import re

import torch

from library.flux_layout import blocks_to_bfl
from library.loading import rename

BFL_PREFIX = "model.diffusion_model."
# a key only FLUX.2 files have (FLUX.1 and Chroma share the block names)
MARKER = "single_stream_modulation.lin.weight"
# one-to-one renames inside double_blocks.N / transformer_blocks.N (diffusers -> file)
DOUBLE = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
          "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
          "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
          "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
          "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
          "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
          "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
       "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
       "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
       "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
       "single_stream_modulation.linear": "single_stream_modulation.lin",
       "proj_out": "final_layer.linear"}
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE, DOUBLE_FUSED),
          "single_transformer_blocks": ("single_blocks", SINGLE, {})}


def is_flux2_key(key: str) -> bool:
    return key.removeprefix(BFL_PREFIX) == MARKER


def transformer_to_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flux2Transformer2DModel state dict in the BFL single-file layout (no "model.diffusion_model." prefix)."""
    return blocks_to_bfl(state, BLOCKS, TOP)


def file_to_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of transformer_to_file (diffusers' converter); keys with or without "model.diffusion_model."."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers({k.removeprefix(BFL_PREFIX): v for k, v in state.items()})


def kohya_layout(module_path: str) -> tuple[str, int, int] | None:
    """AdapterTarget.kohya_layout of the FLUX.2 transformer: (BFL layer name, position among its fused parts, number
    of parts), the names ComfyUI maps (lora_unet_ + the BFL name) and diffusers' Flux2 kohya converter reads:
    transformer_blocks.0.attn.to_k -> ("double_blocks.0.img_attn.qkv", 1, 3), single_transformer_blocks.0.attn.
    to_qkv_mlp_proj -> ("single_blocks.0.linear1", 0, 1); None for a layer outside the blocks."""
    m = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$", module_path)
    if not m:
        return None
    kind, index, rest = m.groups()
    theirs, renames, fused = BLOCKS[kind]
    for name, parts in fused.items():
        if rest in parts:
            return f"{theirs}.{index}.{name}", parts.index(rest), len(parts)
    new = rename(rest, renames)
    return (f"{theirs}.{index}.{new}", 0, 1) if new else None
