"""The tiny SD1 / SD2 model: a diffusers folder and the original single file."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.tokenizers import tiny_clip_tokenizer


SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "clip_sample": False,
             "steps_offset": 1, "prediction_type": "epsilon"}


def build_tiny_sd1(seed: int = 0, v2: bool = False):
    """The parts of a tiny SD1-architecture pipeline (3-level U-Net, 4-level VAE, 3-layer CLIP).
    v2: the SD2 variant (linear attention projections, per-level head counts, OpenCLIP-style gelu
    text encoder saved in the OpenCLIP single-file layout)."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_clip_tokenizer(Path(tmp))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4, 4) if v2 else 4, norm_num_groups=32,
        use_linear_projection=v2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu" if v2 else "quick_gelu",
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=DDPMScheduler(**SCHEDULER))


def save_tiny_sd1(folder: str | Path, seed: int = 0, v2: bool = False) -> tuple[Path, Path]:
    """Write `folder` (diffusers layout) and `folder`.safetensors (original single-file layout)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from library.ldm_layout import pipeline_to_ldm

    folder = Path(folder)
    parts = build_tiny_sd1(seed, v2)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    state = pipeline_to_ldm(parts["unet"].state_dict(), dict(parts["unet"].config), parts["vae"].state_dict(),
                            parts["text_encoder"].state_dict(), "open_clip" if v2 else "clip")
    single = folder.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(single))
    return folder, single
