"""The tiny Z-Image model: a diffusers folder and ComfyUI's transformer / text_encoder / ae files."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.files import ae_file_state, write_files
from library.tiny.flux import build_tiny_flux
from library.tiny.tokenizers import tiny_qwen3_tokenizer


def build_tiny_zimage(seed: int = 0):
    """The parts of a tiny Z-Image-architecture pipeline: a ZImageTransformer2DModel with 2 main layers and one
    noise / one context refiner (2x2 patches of 16-channel latents, RoPE axes summing to the head dim), FLUX.1's
    tiny 16-channel VAE (Z-Image uses FLUX.1's autoencoder), a 3-layer Qwen3 text encoder (grouped-query attention,
    q/k norms) whose width is the transformer's caption width, and its tokenizer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    flux = build_tiny_flux(seed, guidance=False)
    tokenizer = tiny_qwen3_tokenizer()
    torch.manual_seed(seed + 2)
    text_width = 32
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=text_width, axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64])
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return dict(transformer=transformer, vae=flux["vae"], text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def save_tiny_zimage(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and ComfyUI's split files: `folder`.safetensors (the transformer in the
    original layout, library.zimage_layout), `folder`-text_encoder.safetensors (Qwen3 as ComfyUI's
    qwen_3_4b.safetensors: transformers' causal-LM names, `model.` prefix) and `folder`-ae.safetensors."""
    from diffusers import ZImagePipeline

    from library.zimage_layout import transformer_to_original

    folder = Path(folder)
    parts = build_tiny_zimage(seed)
    ZImagePipeline(**parts).save_pretrained(str(folder))
    qwen = {"model." + k: v for k, v in parts["text_encoder"].state_dict().items()}
    return write_files(folder, {"folder": folder, "transformer": folder.with_suffix(".safetensors")}, {
        "transformer": transformer_to_original(parts["transformer"].state_dict()), "text_encoder": qwen,
        "ae": ae_file_state(parts["vae"].state_dict())})
