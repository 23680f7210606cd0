"""The tiny Qwen-Image model: a diffusers folder and ComfyUI's transformer / text_encoder / vae files."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.files import write_files
from library.tiny.tokenizers import tiny_qwen25vl_tokenizer


def tiny_qwen_vl(tokenizer, width: int = 32):
    """A tiny Qwen2.5-VL-architecture model (Qwen2_5_VLForConditionalGeneration: a 2-layer language model with
    grouped-query attention and M-RoPE, a 1-block vision tower), its token ids those of `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                           fullatt_block_indexes=[0], window_size=112, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        **ids)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(seed: int = 0, edit_2511: bool = False):
    """The parts of a tiny Qwen-Image-architecture pipeline: a QwenImageTransformer2DModel with 2 dual-stream
    blocks (16-channel latents packed 2x2, RoPE axes summing to the head dim; with `edit_2511`, Edit-2511's
    zero-timestep modulation of the reference tokens), the Qwen-Image (Wan-2.1-type, 3D causal) VAE at a small
    width with its 16 latent means and deviations, the tiny Qwen2.5-VL model and its tokenizer, and Qwen-Image's
    scheduler (dynamic shift, 0.5 at 256 to 0.9 at 8192 tokens)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from library.loading import arch_dir, read_json

    tokenizer = tiny_qwen25vl_tokenizer()
    torch.manual_seed(seed)
    text_encoder = tiny_qwen_vl(tokenizer)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 6, 6),
        zero_cond_t=edit_2511)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 temperal_downsample=[False, True, True])
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        read_json(arch_dir("qwen-image") / "scheduler" / "scheduler_config.json"))
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def save_tiny_qwen_image(folder: str | Path, seed: int = 0, edit_2511: bool = False) -> dict[str, Path]:
    """Write `folder` (diffusers layout, QwenImagePipeline) and the split files ComfyUI users have:
    `folder`.safetensors (the transformer, ComfyUI's diffusion_models file), `folder`-text_encoder.safetensors
    (Qwen2.5-VL in the layout of ComfyUI's text_encoders/qwen_2.5_vl_7b.safetensors) and `folder`-vae.safetensors
    (the Wan-2.1 layout of ComfyUI's vae/qwen_image_vae.safetensors)."""
    from diffusers import QwenImagePipeline

    from library.qwen_image_layout import text_model_to_file, vae_to_file

    folder = Path(folder)
    parts = build_tiny_qwen_image(seed, edit_2511)
    QwenImagePipeline(**parts).save_pretrained(str(folder))
    return write_files(folder, {"folder": folder, "transformer": folder.with_suffix(".safetensors")}, {
        "transformer": parts["transformer"].state_dict(),
        "text_encoder": text_model_to_file(parts["text_encoder"].state_dict()),
        "vae": vae_to_file(parts["vae"].state_dict())})
