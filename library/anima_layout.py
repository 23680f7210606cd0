"""Anima weights: the original layout (circlestone-labs' `split_files/diffusion_models/anima-*.safetensors`, what
ComfyUI and sd-scripts load: Cosmos-Predict2's MiniTrainDIT under `net.`, with the LLM adapter as
`net.llm_adapter.*`) <-> diffusers' CosmosTransformer3DModel and AnimaTextConditioner.

The DiT part is read with diffusers' own Cosmos-Predict2 converter (convert_cosmos_transformer_checkpoint_to_diffusers);
transformer_to_file writes it back (its inverse, checked against that converter in tests/test_anima.py). The LLM adapter
has the same parameter names in both (diffusers' AnimaTextConditioner mirrors it: `blocks.0.self_attn.q_proj`,
`out_proj`, `norm`, ...): only the `llm_adapter.` prefix becomes the conditioner's own. The original's RoPE buffers
(`pos_embedder.seq`, `dim_spatial_range`, `dim_temporal_range`) are computed, not stored, in diffusers.
"""
from __future__ import annotations

import torch

PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.")
ADAPTER = "llm_adapter."
# a key only an Anima / Cosmos-Predict2 DiT file has (without its prefix)
MARK = "blocks.0.adaln_modulation_cross_attn.1.weight"
ADAPTER_MARK = ADAPTER + "out_proj.weight"  # sd-scripts: the file holds the LLM adapter when it has this key
# diffusers module-path part -> original part, applied in this order on dotted names (whole components)
RENAMES = (
    (".transformer_blocks.", ".blocks."),
    (".norm1.linear_1.", ".adaln_modulation_self_attn.1."), (".norm1.linear_2.", ".adaln_modulation_self_attn.2."),
    (".norm2.linear_1.", ".adaln_modulation_cross_attn.1."), (".norm2.linear_2.", ".adaln_modulation_cross_attn.2."),
    (".norm3.linear_1.", ".adaln_modulation_mlp.1."), (".norm3.linear_2.", ".adaln_modulation_mlp.2."),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q_proj."), (".to_k.", ".k_proj."), (".to_v.", ".v_proj."), (".to_out.0.", ".output_proj."),
    (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm."),
    (".ff.net.0.proj.", ".mlp.layer1."), (".ff.net.2.", ".mlp.layer2."),
    (".patch_embed.proj.", ".x_embedder.proj.1."),
    (".norm_out.linear_1.", ".final_layer.adaln_modulation.1."),
    (".norm_out.linear_2.", ".final_layer.adaln_modulation.2."),
    (".proj_out.", ".final_layer.linear."),
    (".time_embed.t_embedder.", ".t_embedder.1."), (".time_embed.norm.", ".t_embedding_norm."),
)
CONDITIONER = "text_conditioner."  # where the family keeps the adapter: a child of the transformer


def unprefixed(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_dit_key(key: str) -> bool:
    return unprefixed(key) == MARK


def original_name(module_path: str) -> str:
    """A module path (or parameter name) of the family's transformer in the original naming:
    transformer_blocks.0.attn1.to_q -> blocks.0.self_attn.q_proj, text_conditioner.blocks.0.mlp.0 ->
    llm_adapter.blocks.0.mlp.0 (what sd-scripts' lora_anima and ComfyUI name the layers)."""
    if module_path.startswith(CONDITIONER):
        return ADAPTER + module_path[len(CONDITIONER):]
    name = f".{module_path}."
    for ours, theirs in RENAMES:
        name = name.replace(ours, theirs)
    return name[1:-1]


def file_to_parts(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """A DiT file's weights (any of PREFIXES or none) -> (CosmosTransformer3DModel weights, the LLM adapter's
    AnimaTextConditioner weights; empty when the file has none)."""
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    dit, adapter = {}, {}
    for key, value in state.items():
        key = unprefixed(key)
        if key.startswith(ADAPTER):
            adapter[key[len(ADAPTER):]] = value
        else:
            dit[key] = value
    return convert_cosmos_transformer_checkpoint_to_diffusers(dit), adapter


def adapter_file_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A separate LLM adapter file (sd-scripts' llm_adapter_path: its own names, or with `llm_adapter.` and a DiT
    prefix) in AnimaTextConditioner's names."""
    out = {}
    for key, value in state.items():
        key = unprefixed(key)
        out[key[len(ADAPTER):] if key.startswith(ADAPTER) else key] = value
    return out


def transformer_to_file(state: dict[str, torch.Tensor], prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The family's transformer state dict (the DiT with its `text_conditioner.` child) in the original layout,
    `net.` prefixed as the distributed files are."""
    return {prefix + original_name(key): value for key, value in state.items()}
