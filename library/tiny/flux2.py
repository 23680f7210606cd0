"""The tiny FLUX.2 model (klein and dev): a diffusers folder, the BFL transformer and the text_encoder / ae files."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.files import ae_file_state, write_files
from library.tiny.tokenizers import tiny_mistral_tokenizer, tiny_qwen_tokenizer


def _tiny_flux2_text_encoder(tokenizer, width: int, dev: bool):
    """klein: a Qwen3ForCausalLM of 28 layers (its hidden states 9, 18, 27 are read); dev: a
    Mistral3ForConditionalGeneration (Mistral language model of 31 layers: 10, 20, 30 are read; a one-layer Pixtral
    vision tower)."""
    from transformers import (MistralConfig, Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig,
                              Qwen3Config, Qwen3ForCausalLM)

    shape = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=32, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    if not dev:
        return Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=28, tie_word_embeddings=True, **shape))
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=28, patch_size=14)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=MistralConfig(num_hidden_layers=31, **shape), vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2))


def build_tiny_flux2(seed: int = 0, dev: bool = False):
    """The parts of a tiny FLUX.2-architecture pipeline: a Flux2Transformer2DModel with 2 double and 2 single
    blocks (128 input channels: the 32-channel latents patchified 2x2; four RoPE axes; the guidance input for dev,
    none for klein), the 4-level 32-channel AutoencoderKLFlux2 with its latent batch-norm statistics (seeded, not the
    identity), and the text encoder with its tokenizer (klein: Qwen3; dev: Mistral-Small-3-style Mistral3): the
    transformer's text width is 3x the encoder's, three hidden states stacked."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    tokenizer = tiny_mistral_tokenizer() if dev else tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    width = 16
    transformer = Flux2Transformer2DModel(
        in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * width, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=dev)
    vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=32,
                             norm_num_groups=32, sample_size=64)
    vae.bn.running_mean.copy_(torch.randn(128) * 0.1)
    vae.bn.running_var.copy_(torch.rand(128) + 0.5)
    text_encoder = _tiny_flux2_text_encoder(tokenizer, width, dev)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_tiny_flux2(folder: str | Path, seed: int = 0, dev: bool = False) -> dict[str, Path]:
    """Write `folder` (diffusers layout: Flux2KleinPipeline, or Flux2Pipeline for dev) and the files users have:
    `folder`.safetensors (the BFL transformer, library.flux2_layout), `folder`-text_encoder.safetensors (the
    language model alone, as ComfyUI's text_encoders/ files: no lm_head, no vision tower) and `folder`-ae.safetensors
    (the VAE in the original layout, with its bn. statistics)."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    from library.flux2_layout import transformer_to_file

    folder = Path(folder)
    parts = build_tiny_flux2(seed, dev)
    (Flux2Pipeline if dev else Flux2KleinPipeline)(**parts).save_pretrained(str(folder))
    vae_state = parts["vae"].state_dict()
    ae = ae_file_state({k: v for k, v in vae_state.items() if not k.startswith("bn.")})
    ae.update({k: v for k, v in vae_state.items() if k.startswith("bn.")})
    text = {k: v for k, v in parts["text_encoder"].state_dict().items()
            if not k.startswith(("lm_head.", "model.vision_tower.", "model.multi_modal_projector."))}
    return write_files(folder, {"folder": folder, "transformer": folder.with_suffix(".safetensors")}, {
        "transformer": transformer_to_file(parts["transformer"].state_dict()), "text_encoder": text, "ae": ae})
