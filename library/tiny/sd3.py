"""The tiny SD3 model: a diffusers folder, the SAI single files and the separate text encoder files."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.files import t5_file_state, write_files
from library.tiny.tokenizers import tiny_clip_tokenizer, tiny_t5_tokenizer


def build_tiny_sd3(seed: int = 0):
    """The parts of a tiny SD3-architecture pipeline: an SD3Transformer2DModel with 2 joint blocks (the first with
    SD3.5-medium's second image attention, q/k RMS norm as SD3.5, the last one's context stream pre-only), the
    4-level 16-channel VAE without quant convs (SD3's scaling and shift factors), CLIP-L- and CLIP-G-style text
    encoders with projections (different widths; their penultimate states, concatenated, are narrower than T5's
    as in SD3) and a T5 encoder, with their tokenizers (tokenizer_2 pads with "!", as SD3's does)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
        tokenizer.save_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")
    tokenizer_3 = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip_l, clip_g, t5_width = 32, 48, 96
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=t5_width, caption_projection_dim=16,
        pooled_projection_dim=clip_l + clip_g, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16, norm_num_groups=32, sample_size=64, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True)
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=clip_l, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
        projection_dim=clip_l, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=clip_g, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
        projection_dim=clip_g, **ids))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
                scheduler=scheduler)


def save_tiny_sd3(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and the files users have: `folder`.safetensors (SAI layout: transformer,
    VAE and the three text encoders, as sd3_medium_incl_clips_t5xxlfp16.safetensors), `folder`-transformer.safetensors
    (transformer and VAE only, as sd3_medium.safetensors) and the separate `folder`-clip_l / -clip_g / -t5xxl files."""
    from diffusers import StableDiffusion3Pipeline

    from library.sd3_layout import SAI_PREFIX, transformer_to_sai
    from library.ldm_layout import vae_to_ldm

    folder = Path(folder)
    parts = build_tiny_sd3(seed)
    StableDiffusion3Pipeline(**parts).save_pretrained(str(folder))
    encoders = {"clip_l": dict(parts["text_encoder"].state_dict()),
                "clip_g": dict(parts["text_encoder_2"].state_dict()),
                "t5xxl": t5_file_state(parts["text_encoder_3"].state_dict())}
    model = {SAI_PREFIX + k: v for k, v in transformer_to_sai(parts["transformer"].state_dict()).items()}
    model.update(vae_to_ldm(parts["vae"].state_dict()))
    everything = dict(model)
    for name, state in encoders.items():
        everything.update({f"text_encoders.{name}.transformer.{k}": v for k, v in state.items()})
    files = {"folder": folder, "single": folder.with_suffix(".safetensors"),
             "transformer": folder.with_name(f"{folder.name}-transformer.safetensors")}
    return write_files(folder, files, {"single": everything, "transformer": model, **encoders})
