"""The single files a tiny model is written as beside its diffusers folder, in the layouts users have."""
from __future__ import annotations

from pathlib import Path

import torch


def write_files(folder: Path, files: dict[str, Path], states: dict[str, dict[str, torch.Tensor]]) -> dict[str, Path]:
    """Each of `states` saved as safetensors at its path in `files`, or else at `folder`-<name>.safetensors beside
    the folder; `files` gets every path, in the order of `states` after its own, and is returned."""
    from safetensors.torch import save_file

    for name, state in states.items():
        path = files.get(name) or folder.with_name(f"{folder.name}-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[name] = path
    return files


def ae_file_state(vae_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL's state in the original (ldm) layout without its `first_stage_model.` prefix: the
    separate ae.safetensors of FLUX.1, Chroma, FLUX.2 and Z-Image."""
    from library.ldm_layout import VAE_PREFIX, vae_to_ldm

    return {k[len(VAE_PREFIX):]: v for k, v in vae_to_ldm(vae_state).items()}


def t5_file_state(t5_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A T5EncoderModel's state as the separate t5xxl files hold it: without encoder.embed_tokens.weight (tied to
    shared.weight)."""
    return {k: v for k, v in t5_state.items() if k != "encoder.embed_tokens.weight"}
