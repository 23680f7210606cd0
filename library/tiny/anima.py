"""The tiny Anima model: a modular-pipeline folder and ComfyUI's DiT / text_encoder / vae files."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.files import write_files
from library.tiny.tokenizers import tiny_qwen3_tokenizer, tiny_t5_tokenizer


def build_tiny_anima(seed: int = 0) -> dict:
    """The parts of a tiny Anima: a CosmosTransformer3DModel with 2 blocks (2 heads of 16, adaLN-LoRA width 8,
    Anima's RoPE scales and padding-mask channel, no learnable position embedding), the LLM adapter
    (AnimaTextConditioner: 2 blocks, 4 heads, the tiny T5 vocabulary, outputs padded to 512 tokens as Anima's), a
    2-layer Qwen3 whose width is the adapter's source width, the Qwen-Image VAE at a small width with its 16 latent
    means and deviations, both tokenizers, and Anima's scheduler (shift 3.0)."""
    from diffusers import (AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen3Config, Qwen3Model

    from library.loading import arch_dir, read_json

    tokenizer, t5_tokenizer = tiny_qwen3_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    width = 32
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    conditioner = AnimaTextConditioner(source_dim=width, target_dim=width, model_dim=width, num_layers=2,
                                       num_attention_heads=4, target_vocab_size=len(t5_tokenizer))
    transformer = CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        text_embed_dim=width, adaln_lora_dim=8, rope_scale=(1.0, 4.0, 4.0), extra_pos_embed_type=None)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True],
                                 **{k: read_json(arch_dir("anima") / "vae" / "config.json")[k]
                                    for k in ("latents_mean", "latents_std")})
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        read_json(arch_dir("anima") / "scheduler" / "scheduler_config.json"))
    return dict(transformer=transformer, text_conditioner=conditioner, vae=vae, text_encoder=text_encoder,
                tokenizer=tokenizer, t5_tokenizer=t5_tokenizer, scheduler=scheduler)


def save_tiny_anima(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (AnimaModularPipeline's layout) and the split files ComfyUI users have: `folder`.safetensors
    (the DiT with the LLM adapter, `net.` names: diffusion_models/anima-*.safetensors), `folder`-text_encoder
    (Qwen3 with causal-LM names, as text_encoders/qwen_3_06b_base.safetensors) and `folder`-vae (the Wan-2.1
    layout of vae/qwen_image_vae.safetensors)."""
    from diffusers import AnimaAutoBlocks

    from library.anima_layout import transformer_to_file
    from library.qwen_image_layout import vae_to_file

    folder = Path(folder)
    parts = build_tiny_anima(seed)
    pipe = AnimaAutoBlocks().init_pipeline()
    pipe.update_components(**parts)
    pipe.save_pretrained(str(folder), overwrite_modular_index=True)
    dit = {**parts["transformer"].state_dict(),
           **{"text_conditioner." + k: v for k, v in parts["text_conditioner"].state_dict().items()}}
    return write_files(folder, {"folder": folder, "transformer": folder.with_suffix(".safetensors")}, {
        "transformer": transformer_to_file(dit),
        "text_encoder": {"model." + k: v for k, v in parts["text_encoder"].state_dict().items()},
        "vae": vae_to_file(parts["vae"].state_dict())})
