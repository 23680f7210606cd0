"""Convert Stable Diffusion 1.x / 2.x and SDXL weights from diffusers layout to the
original single-file (CompVis / LDM, SAI for SDXL) layout that UIs such as A1111 and ComfyUI load.

Every function takes a plain ``{name: tensor}`` state dict and returns a new one;
tensors are passed through unchanged (no copy, no dtype change) except where the
LDM layout needs a different shape (VAE attention 1x1 convs, fused OpenCLIP q/k/v).

The key renames are derived from the model structure by rule:
a table of *module prefixes* (``down_blocks.1.resnets.0.`` -> ``input_blocks.4.0.``)
is built from the block layout, and a few leaf renames are applied inside a
module (``norm1`` -> ``in_layers.0`` ...). Any key not covered raises ``KeyError``
instead of being silently dropped.

Known limitation (SD2 text encoder): the original OpenCLIP ViT-H text tower has
24 resblocks plus ``text_projection`` and ``logit_scale``; diffusers' SD2 text
encoder keeps only the first 23 layers (SD2 conditions on the penultimate layer).
The missing last resblock (and ``logit_scale``; ``text_projection`` too unless a
``CLIPTextModelWithProjection`` is given) cannot be recreated, so
:func:`open_clip_to_ldm` converts what is there (``resblocks.0`` .. ``resblocks.22``
for the real model). SD2 conditions on the penultimate layer, so the last block
does not affect generation, but a loader that checks keys strictly will report it
missing.
"""

from __future__ import annotations

import torch
from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# Leaf renames inside one UNet ResBlock (diffusers -> LDM).
_UNET_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Leaf renames inside VAE modules (resnets and the mid-block attention).
_VAE_LEAVES = {
    "conv_shortcut": "nin_shortcut",
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# Leaf renames inside one OpenCLIP resblock (q/k/v are handled separately).
_OPEN_CLIP_LEAVES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split_prefix(key: str, prefixes: dict[str, str]) -> tuple[str, str]:
    """Return the longest ``prefix`` of ``key`` present in ``prefixes`` and the rest."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n]) + "."
        if prefix in prefixes:
            return prefix, key[len(prefix):]
    raise KeyError(f"no LDM mapping for diffusers key {key!r}")


def _rename_leaf(rest: str, leaves: dict[str, str]) -> str:
    """Rename the trailing module name(s) of ``rest`` (the part before ``.weight``/``.bias``)."""
    module, _, param = rest.rpartition(".")
    for old, new in leaves.items():
        if module == old or module.endswith("." + old):
            return f"{module[: len(module) - len(old)]}{new}.{param}"
    return rest


def _per_level(value, n: int) -> list:
    return [value] * n if isinstance(value, int) else list(value)


# --------------------------------------------------------------------------- UNet


def _unet_prefix_map(config: dict) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, derived from the UNet config.

    LDM numbers its blocks flatly: ``input_blocks`` holds conv_in, then per level
    ``layers`` (resnet[, attention]) pairs and a downsampler (not on the last level);
    ``output_blocks`` holds per level ``layers + 1`` (resnet[, attention][, upsampler]).
    """
    n = len(config["block_out_channels"])
    layers = _per_level(config["layers_per_block"], n)
    m = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size embedding
        m["add_embedding.linear_1."] = "label_emb.0.0."
        m["add_embedding.linear_2."] = "label_emb.0.2."
    k = 1
    for i in range(n):
        for j in range(layers[i]):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{k}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{k}.1."
            k += 1
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{k}.0.op."
            k += 1
    k = 0
    for i, block_type in enumerate(config["up_block_types"]):
        for j in range(layers[n - 1 - i] + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{k}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{k}.1."
            k += 1
        if i < n - 1:  # the upsampler follows the last resnet[/attention] of the level
            slot = 2 if "Attn" in block_type else 1
            m[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{k - 1}.{slot}.conv."
    return m


def unet_to_ldm(state_dict: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict + config -> ``model.diffusion_model.*``.

    Transformer internals (``transformer_blocks.N.attn1.to_q`` ...) and
    ``proj_in``/``proj_out`` keep their names and shapes: SD1 uses 1x1 convs and
    SD2 (``use_linear_projection=True``) Linear layers on both sides.
    """
    prefixes = _unet_prefix_map(config)
    out = {}
    for key, tensor in state_dict.items():
        prefix, rest = _split_prefix(key, prefixes)
        if ".resnets." in prefix:
            rest = _rename_leaf(rest, _UNET_RESNET_LEAVES)
        _put(out, UNET_PREFIX + prefixes[prefix] + rest, tensor)
    return out


# --------------------------------------------------------------------------- VAE


def _vae_prefix_map(num_levels: int) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for ``AutoencoderKL``.

    LDM numbers decoder ``up`` levels by resolution like the encoder (``up.0`` is
    full resolution) while diffusers runs them in execution order (lowest
    resolution first), so diffusers ``up_blocks.i`` is ``up.{n-1-i}``.
    """
    m = {f"{name}.": f"{name}." for name in ("quant_conv", "post_quant_conv")}
    for coder in ("encoder", "decoder"):
        m.update({f"{coder}.conv_in.": f"{coder}.conv_in.", f"{coder}.conv_out.": f"{coder}.conv_out."})
        m[f"{coder}.conv_norm_out."] = f"{coder}.norm_out."
        m[f"{coder}.mid_block.resnets.0."] = f"{coder}.mid.block_1."
        m[f"{coder}.mid_block.resnets.1."] = f"{coder}.mid.block_2."
        m[f"{coder}.mid_block.attentions.0."] = f"{coder}.mid.attn_1."
    for i in range(num_levels):
        up = num_levels - 1 - i
        m[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        m[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{up}.block."
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{up}.upsample."
    return m


def vae_to_ldm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> ``first_stage_model.*``.

    The mid-block attention q/k/v/proj_out are Linear ``[C, C]`` in diffusers
    and 1x1 convs ``[C, C, 1, 1]`` in LDM.
    """
    num_levels = len({k.split(".")[2] for k in state_dict if k.startswith("decoder.up_blocks.")})
    prefixes = _vae_prefix_map(num_levels)
    out = {}
    for key, tensor in state_dict.items():
        prefix, rest = _split_prefix(key, prefixes)
        rest = _rename_leaf(rest, _VAE_LEAVES)
        if ".attentions." in prefix and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        _put(out, VAE_PREFIX + prefixes[prefix] + rest, tensor)
    return out


# --------------------------------------------------------------------------- text encoders


def _text_model_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Normalise a transformers CLIP text state dict to ``text_model.*`` keys.

    transformers >= 5.6 flattened ``CLIPTextModel`` (keys ``encoder.layers...``),
    older versions and ``CLIPTextModelWithProjection`` nest it under ``text_model.``.
    The non-persistent ``position_ids`` buffer is dropped if present.
    """
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        nested = key.startswith("text_model.") or key == "text_projection.weight"
        out[key if nested else "text_model." + key] = tensor
    return out


def clip_to_ldm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` (SD1) -> ``cond_stage_model.transformer.text_model.*``."""
    return {CLIP_PREFIX + k: v for k, v in _text_model_keys(state_dict).items()}


def _open_clip_key(key: str) -> str:
    """Rename one non-q/k/v key of a diffusers OpenCLIP text tower."""
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    if key in fixed:
        return fixed[key]
    layers = "text_model.encoder.layers."
    if not key.startswith(layers):
        raise KeyError(f"no LDM mapping for OpenCLIP key {key!r}")
    index, rest = key[len(layers):].split(".", 1)
    return f"transformer.resblocks.{index}.{_rename_leaf(rest, _OPEN_CLIP_LEAVES)}"


def open_clip_to_ldm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` holding SD2's OpenCLIP tower -> ``cond_stage_model.model.*``.

    q/k/v projections are concatenated (in that order) into ``attn.in_proj_weight``
    / ``attn.in_proj_bias``. A ``text_projection.weight`` (only present for
    ``CLIPTextModelWithProjection``) becomes the transposed ``text_projection``.
    Only the layers present are converted: see the module docstring for the
    resblock diffusers drops.
    """
    out, qkv = {}, {}
    for key, tensor in _text_model_keys(state_dict).items():
        if key == "text_projection.weight":
            _put(out, OPEN_CLIP_PREFIX + "text_projection", tensor.T.contiguous())
        elif any(f"self_attn.{p}_proj." in key for p in "qkv"):
            qkv[key] = tensor
        else:
            _put(out, OPEN_CLIP_PREFIX + _open_clip_key(key), tensor)
    for q_key in [k for k in qkv if ".q_proj." in k]:
        fused = torch.cat([qkv.pop(q_key.replace(".q_proj.", f".{p}_proj.")) for p in "qkv"])
        layer, param = q_key.split(".")[3], q_key.rsplit(".", 1)[1]
        _put(out, f"{OPEN_CLIP_PREFIX}transformer.resblocks.{layer}.attn.in_proj_{param}", fused)
    if qkv:
        raise KeyError(f"k/v projections without a matching q_proj: {sorted(qkv)}")
    return out


# --------------------------------------------------------------------------- pipeline


def pipeline_to_ldm(
    unet_sd: dict[str, Tensor],
    unet_config: dict,
    vae_sd: dict[str, Tensor],
    text_encoder_sd: dict[str, Tensor],
    text_encoder_kind: str,
) -> dict[str, Tensor]:
    """Full SD1 (``text_encoder_kind="clip"``) or SD2 (``"open_clip"``) single-file state dict."""
    text_converters = {"clip": clip_to_ldm, "open_clip": open_clip_to_ldm}
    if text_encoder_kind not in text_converters:
        raise ValueError(f"text_encoder_kind must be 'clip' or 'open_clip', got {text_encoder_kind!r}")
    out = unet_to_ldm(unet_sd, unet_config)
    for part in (vae_to_ldm(vae_sd), text_converters[text_encoder_kind](text_encoder_sd)):
        for key, tensor in part.items():
            _put(out, key, tensor)
    return out


def sdxl_pipeline_to_ldm(
    unet_sd: dict[str, Tensor],
    unet_config: dict,
    vae_sd: dict[str, Tensor],
    text_encoder_sd: dict[str, Tensor],
    text_encoder_2_sd: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Full SDXL single-file state dict in the SAI (generative-models) layout.

    ``conditioner.embedders.0.transformer.text_model.*`` holds CLIP-L in transformers layout;
    ``conditioner.embedders.1.model.*`` holds OpenCLIP bigG (fused q/k/v, ``text_projection``
    as [hidden, projection]). The U-Net's ``add_embedding`` becomes ``label_emb.0.{0,2}``; the
    transformer depth of each level needs no mapping (``transformer_blocks.N`` keeps its name).
    OpenCLIP's ``logit_scale`` has no counterpart in diffusers and is not written.
    """
    out = unet_to_ldm(unet_sd, unet_config)
    te1 = {SDXL_CLIP_PREFIX + k[len(CLIP_PREFIX):]: v for k, v in clip_to_ldm(text_encoder_sd).items()}
    te2 = {SDXL_OPEN_CLIP_PREFIX + k[len(OPEN_CLIP_PREFIX):]: v
           for k, v in open_clip_to_ldm(text_encoder_2_sd).items()}
    for part in (vae_to_ldm(vae_sd), te1, te2):
        for key, tensor in part.items():
            _put(out, key, tensor)
    return out


def _put(out: dict[str, Tensor], key: str, tensor: Tensor) -> None:
    if key in out:
        raise KeyError(f"two diffusers keys map to LDM key {key!r}")
    out[key] = tensor
