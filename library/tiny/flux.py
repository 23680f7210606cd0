"""The tiny FLUX.1 model (dev and schnell): a diffusers folder, the BFL transformer and the clip_l / t5xxl / ae
files."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.files import ae_file_state, t5_file_state, write_files
from library.tiny.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer


def build_tiny_flux(seed: int = 0, guidance: bool = True):
    """The parts of a tiny FLUX.1-architecture pipeline: a FluxTransformer2DModel with 2 double and 2 single
    blocks (16-channel latents packed 2x2, RoPE axes summing to the head dim; guidance embedding for the dev
    variant), the 4-level 16-channel VAE without quant convs (scaling and shift factors as FLUX's), a CLIP-L-
    style text encoder and a T5 encoder (gated-gelu, as T5 v1.1), with their tokenizers."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
    tokenizer_2 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip_width, t5_width = 32, 48
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=t5_width, pooled_projection_dim=clip_width,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=clip_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=clip_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)


def save_tiny_flux(folder: str | Path, seed: int = 0, guidance: bool = True) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and the files users have: `folder`.safetensors (the BFL transformer),
    `folder`-clip_l.safetensors, `folder`-t5xxl.safetensors and `folder`-ae.safetensors (original VAE layout)."""
    from diffusers import FluxPipeline

    from library.flux_layout import transformer_to_bfl

    folder = Path(folder)
    parts = build_tiny_flux(seed, guidance)
    FluxPipeline(**parts).save_pretrained(str(folder))
    clip = {("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in parts["text_encoder"].state_dict().items()}
    return write_files(folder, {"folder": folder, "transformer": folder.with_suffix(".safetensors")}, {
        "transformer": transformer_to_bfl(parts["transformer"].state_dict()), "clip_l": clip,
        "t5xxl": t5_file_state(parts["text_encoder_2"].state_dict()), "ae": ae_file_state(parts["vae"].state_dict())})
