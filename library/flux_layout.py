"""FLUX.1 transformer weights: diffusers' FluxTransformer2DModel names -> the BFL single-file names that
ComfyUI, Forge, sd-scripts and diffusers' from_single_file read (double_blocks.N.img_attn.qkv, ...).

diffusers has the other direction (convert_flux_transformer_checkpoint_to_diffusers); a test checks that the
two are inverse. The BFL file fuses q, k, v (double blocks) and q, k, v, mlp-in (single blocks) into one
Linear each, and its final modulation is (shift, scale) where diffusers' norm_out is (scale, shift).
"""
from __future__ import annotations

import re

import torch

from library.loading import fuse_parts, rename

# one-to-one renames inside double_blocks.N / transformer_blocks.N
DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
          "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
          "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
          "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
          "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
          "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
          "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q.weight": "norm.query_norm.scale",
          "attn.norm_k.weight": "norm.key_norm.scale", "proj_out": "linear2"}
TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
       "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
       "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
       "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
       "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
       "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
       "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
       "proj_out": "final_layer.linear"}
# fused layers: BFL name -> the diffusers layers concatenated along the output dimension, in order
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE, DOUBLE_FUSED),
          "single_transformer_blocks": ("single_blocks", SINGLE, SINGLE_FUSED)}


def transformer_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in the BFL single-file layout (no "model.diffusion_model." prefix)."""
    return blocks_to_bfl(state, BLOCKS, TOP)


def blocks_to_bfl(state: dict[str, torch.Tensor], blocks: dict, top: dict[str, str]) -> dict[str, torch.Tensor]:
    """A FLUX-line transformer state dict in the BFL layout: `blocks` maps each diffusers block list to (its BFL
    name, one-to-one renames inside a block, fused layers), `top` renames what is outside the blocks; the
    final norm's (scale, shift) rows become BFL's (shift, scale). FLUX.1 and FLUX.2 differ only in the tables."""
    out: dict[str, torch.Tensor] = {}
    for ours, (theirs, renames, fused) in blocks.items():
        for i in sorted({int(m.group(1)) for k in state for m in [re.match(rf"{ours}\.(\d+)\.", k)] if m}):
            pre = f"{ours}.{i}."
            tensors, used = fuse_parts(state, pre, fused, f"{theirs}.{i}.")
            out.update(tensors)
            for key in [k for k in state if k.startswith(pre) and k not in used]:
                new = rename(key[len(pre):], renames)
                if new is None:
                    raise KeyError(f"no BFL name for {key}")
                out[f"{theirs}.{i}.{new}"] = state[key]
    for key, value in state.items():
        if key.startswith(tuple(f"{b}." for b in blocks)):
            continue
        if key.startswith("norm_out.linear."):
            scale, shift = value.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1." + key.rsplit(".", 1)[1]] = torch.cat([shift, scale])
            continue
        new = rename(key, top)
        if new is None:
            raise KeyError(f"no BFL name for {key}")
        out[new] = value
    return out


def bfl_module_name(module_path: str) -> str | None:
    """The BFL / kohya name of the layer a diffusers module path belongs to (a q, k or v projection maps to
    its fused qkv / linear1): transformer_blocks.0.attn.to_q -> double_blocks.0.img_attn.qkv; None where
    the module has no BFL counterpart."""
    m = re.match(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)$", module_path)
    if not m:
        return rename(module_path, TOP) or ("final_layer.adaLN_modulation.1" if module_path == "norm_out.linear"
                                             else None)
    kind, index, rest = m.groups()
    single = kind == "single_transformer_blocks"
    block = f"{'single_blocks' if single else 'double_blocks'}.{index}"
    for name, parts in (SINGLE_FUSED if single else DOUBLE_FUSED).items():
        if rest in parts:
            return f"{block}.{name}"
    new = rename(rest, SINGLE if single else DOUBLE)
    return f"{block}.{new}" if new else None


def kohya_layout(module_path: str) -> tuple[str, int, int] | None:
    """AdapterTarget.kohya_layout of the FLUX transformer: (BFL layer name, position among its fused parts,
    number of parts), as sd-scripts' lora_flux names adapter layers: transformer_blocks.0.attn.to_k ->
    ("double_blocks.0.img_attn.qkv", 1, 3), single_transformer_blocks.0.proj_mlp -> ("single_blocks.0.linear1",
    3, 4), transformer_blocks.0.attn.to_out.0 -> ("double_blocks.0.img_attn.proj", 0, 1)."""
    name = bfl_module_name(module_path)
    if name is None:
        return None
    m = re.match(r"(single_transformer_blocks|transformer_blocks)\.\d+\.(.+)$", module_path)
    if m:
        for parts in (SINGLE_FUSED if m.group(1) == "single_transformer_blocks" else DOUBLE_FUSED).values():
            if m.group(2) in parts:
                return name, parts.index(m.group(2)), len(parts)
    return name, 0, 1


def bfl_to_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of transformer_to_bfl, at any width (diffusers' own converter assumes FLUX.1's 3072).
    Accepts keys with or without the "model.diffusion_model." prefix."""
    prefix = "model.diffusion_model."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    inverse = {"double_blocks": ("transformer_blocks", {v: k for k, v in DOUBLE.items()}, DOUBLE_FUSED),
               "single_blocks": ("single_transformer_blocks", {v: k for k, v in SINGLE.items()}, SINGLE_FUSED)}
    top = {v: k for k, v in TOP.items()}
    for key, value in state.items():
        m = re.match(r"(double_blocks|single_blocks)\.(\d+)\.(.+)\.(weight|bias|scale)$", key)
        if m:
            kind, index, name, suffix = m.groups()
            ours, renames, fused = inverse[kind]
            if name in fused:
                parts = fused[name]
                if len(parts) == 3:
                    chunks = value.chunk(3, dim=0)
                else:  # linear1: q, k, v of width `inner`, then the MLP input
                    inner = state[f"{kind}.{index}.linear2.weight"].shape[0]
                    chunks = value.split([inner, inner, inner, value.shape[0] - 3 * inner], dim=0)
                for part, chunk in zip(parts, chunks):
                    out[f"{ours}.{index}.{part}.{suffix}"] = chunk
                continue
            new = rename(f"{name}.{suffix}", renames)
            if new is None:
                raise KeyError(f"unknown FLUX key {key}")
            out[f"{ours}.{index}.{new}"] = value
        elif key.startswith("final_layer.adaLN_modulation.1."):
            shift, scale = value.chunk(2, dim=0)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift])
        else:
            new = rename(key, top)
            if new is None:
                raise KeyError(f"unknown FLUX key {key}")
            out[new] = value
    return out
