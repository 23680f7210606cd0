"""The tiny Chroma model: a diffusers folder, the Chroma transformer and the t5xxl / ae files."""
from __future__ import annotations

from pathlib import Path

import torch

from library.tiny.files import ae_file_state, t5_file_state, write_files
from library.tiny.flux import build_tiny_flux


def build_tiny_chroma(seed: int = 0):
    """The parts of a tiny Chroma-architecture pipeline: a ChromaTransformer2DModel with 2 double and 2 single
    blocks and a 2-layer approximator (the FLUX.1 widths of build_tiny_flux), FLUX.1's tiny 16-channel VAE and
    T5 encoder with its tokenizer (Chroma has no CLIP-L)."""
    from diffusers import ChromaTransformer2DModel

    flux = build_tiny_flux(seed, guidance=False)
    torch.manual_seed(seed + 1)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=flux["text_encoder_2"].config.d_model, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
    return dict(transformer=transformer, vae=flux["vae"], text_encoder=flux["text_encoder_2"],
                tokenizer=flux["tokenizer_2"], scheduler=flux["scheduler"])


def save_tiny_chroma(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write `folder` (diffusers layout) and the files users have: `folder`.safetensors (the Chroma transformer,
    library.chroma_layout), `folder`-t5xxl.safetensors and `folder`-ae.safetensors (original VAE layout)."""
    from diffusers import ChromaPipeline

    from library.chroma_layout import transformer_to_file

    folder = Path(folder)
    parts = build_tiny_chroma(seed)
    ChromaPipeline(**parts).save_pretrained(str(folder))
    return write_files(folder, {"folder": folder, "transformer": folder.with_suffix(".safetensors")}, {
        "transformer": transformer_to_file(parts["transformer"].state_dict()),
        "t5xxl": t5_file_state(parts["text_encoder"].state_dict()), "ae": ae_file_state(parts["vae"].state_dict())})
