"""The tiny SDXL model: a diffusers folder and the SAI single file."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.sd1 import SCHEDULER
from library.tiny.tokenizers import tiny_clip_tokenizer


def build_tiny_sdxl(seed: int = 0):
    """The parts of a tiny SDXL-architecture pipeline: a 3-level U-Net laid out as SDXL's (no attention
    on the first level, 2 resnets per level, transformer depth growing with the level, linear
    projections, "text_time" size/pooled-text embedding), the 4-level VAE, CLIP-L-style and
    OpenCLIP-bigG-style (gelu, projection) text encoders of different widths, and their tokenizers
    (the second pads with "!", as SDXL's tokenizer_2 does)."""
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
        tokenizer.save_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")
    torch.manual_seed(seed)
    te1_width, te2_width, time_dim = 32, 64, 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), norm_num_groups=32,
        cross_attention_dim=te1_width + te2_width, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=te2_width + 6 * time_dim)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.13025, force_upcast=True)
    ids = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=te1_width, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        hidden_act="quick_gelu", projection_dim=te1_width, **ids))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=te2_width, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        hidden_act="gelu", projection_dim=te2_width, **ids))
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k != "clip_sample"},
                                       timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)


def save_tiny_sdxl(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write `folder` (diffusers layout) and `folder`.safetensors (SAI single-file layout)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from library.ldm_layout import sdxl_pipeline_to_ldm

    folder = Path(folder)
    parts = build_tiny_sdxl(seed)
    StableDiffusionXLPipeline(**parts).save_pretrained(str(folder))
    state = sdxl_pipeline_to_ldm(parts["unet"].state_dict(), dict(parts["unet"].config), parts["vae"].state_dict(),
                                 parts["text_encoder"].state_dict(), parts["text_encoder_2"].state_dict())
    single = folder.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    return folder, single
