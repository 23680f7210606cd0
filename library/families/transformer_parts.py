"""What the transformer families (SD3, the FLUX line, Chroma, Qwen-Image, Z-Image, Anima) share: loading a transformer
file (refused while its separate files are unset) or a folder, assigning separate single files (clip_l, clip_g,
t5xxl) to encoders built on the meta device, T5-XXL encoding with its padding mask, and the shifted, scaled
16-channel latents of their autoencoders; the FLUX line's 2x2 latent packing and image position ids; the Qwen
lineage's parts: the Qwen-Image VAE (Qwen-Image, Anima) and Qwen3 text-encoder files (Z-Image, Anima)."""
from __future__ import annotations

from typing import Callable

import torch

from library.families.base import Components, ModelSource, is_single_file
from library.loading import CheckpointError


def missing_files_problem(source: ModelSource, keys, what: str, file_of=getattr) -> str | None:
    """single_file_problem of a transformer file (`what`: "a Chroma transformer file") whose separate files,
    the model keys `keys`, are not all set; `file_of(source, key)` reads one (the key itself by default)."""
    missing = [k for k in keys if not file_of(source, k)]
    if not missing:
        return None
    return f"{what} holds the transformer only; set " + ", ".join(f"model.{k}" for k in missing) + \
        " to the separate files"


def load_file_or_folder(source: ModelSource, single_file: Callable[[ModelSource], Components],
                        folder: Callable[[ModelSource], Components],
                        problem: Callable[[dict, ModelSource], str | None] | None = None) -> Components:
    """A family's load(): `single_file(source)` for a single transformer file (refused first with the family's
    `problem` = single_file_problem, when given), else `folder(source)`; the parts remember `source`."""
    if is_single_file(source.path):
        found = problem({}, source) if problem else None
        if found:
            raise CheckpointError(f"{source.path}: {found}")
        parts = single_file(source)
    else:
        parts = folder(source)
    parts.source = source
    return parts


def assign_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], path) -> None:
    """Load every weight of `module` (built on the meta device) from `state`, by assignment; names `path` in
    the error when the file does not match the architecture."""
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # weights of other shapes: another model's file, or another size of this one
        mismatch = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise CheckpointError(f"{path}: does not match the architecture: {mismatch}") from None
    missing = [k for k in result.missing_keys if k in dict(module.named_parameters())]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: does not match the architecture: missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")
    for name, buffer in list(module.named_buffers()):
        if not buffer.is_meta:
            continue
        if not name.endswith("position_ids"):
            raise CheckpointError(f"{path}: buffer {name} was not loaded")
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        owner.register_buffer(name.rsplit(".", 1)[-1], torch.arange(buffer.shape[-1]).expand(buffer.shape),
                              persistent=False)  # non-persistent CLIP position ids: rebuilt on the CPU


def clip_keys(state: dict[str, torch.Tensor], model, identity: bool = False) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights (transformers names, with or without "text_model.") in this model's naming;
    with `identity`, a missing text_projection is the identity (SD3's CLIP-L in SAI files)."""
    wanted = set(model.state_dict())
    out = {}
    for key, value in state.items():
        for candidate in (key, key.removeprefix("text_model."), "text_model." + key):
            if candidate in wanted:
                out[candidate] = value
                break
    if identity and "text_projection.weight" in wanted and "text_projection.weight" not in out:
        dtype = next(iter(out.values())).dtype if out else torch.float32
        out["text_projection.weight"] = torch.eye(model.config.hidden_size, dtype=dtype)
    return out


def t5_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A t5xxl state dict: the shared embedding appears as shared.weight and/or encoder.embed_tokens.weight."""
    state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # one module in T5EncoderModel
    return state


def t5_max_length(parts, default: int) -> int:
    """model.t5xxl_max_token_length, else the family's default."""
    source = parts.source
    return source.t5xxl_max_token_length if source is not None and source.t5xxl_max_token_length else default


def encode_t5(parts, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """T5's last hidden state (B, L, 4096) of the captions padded to `max_length`, and with apply_t5_attn_mask the
    padding mask (B, L) (padded positions are then zero in the output too); else None."""
    t5, tokenizer = parts.text_encoders["te3"], parts.tokenizers["te3"]
    tokens = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask.to(t5.device)
    if not (parts.source and parts.source.apply_t5_attn_mask):
        return t5(tokens.input_ids.to(t5.device)).last_hidden_state, None
    hidden = t5(tokens.input_ids.to(t5.device), attention_mask=mask).last_hidden_state
    mask = mask.to(hidden.device)  # T5 may have run elsewhere (library/offload.py brings it over for its forward)
    return hidden * mask.unsqueeze(-1).to(hidden.dtype), mask


def encode_latents(parts, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> (latents - shift_factor) * scaling_factor, as the SD3 / FLUX pipelines scale them."""
    vae = parts.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token, as FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def latent_image_ids(h: int, w: int, device) -> torch.Tensor:
    """(h/2 * w/2, 3): (0, row, column) of each packed token, as FluxPipeline._prepare_latent_image_ids."""
    rows = torch.arange(h // 2, device=device).view(-1, 1).expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device).view(1, -1).expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def load_ae(path: str, arch) -> "AutoencoderKL":
    """The FLUX-type autoencoder (FLUX.1, Chroma): a diffusers folder, or a single file (BFL `ae.safetensors`)
    read with the architecture's vae config."""
    from pathlib import Path

    from diffusers import AutoencoderKL

    from library.loading import read_checkpoint

    if Path(path).is_dir():
        return AutoencoderKL.from_pretrained(path)
    return AutoencoderKL.from_single_file(read_checkpoint(path), config=str(arch), subfolder="vae",
                                          local_files_only=True)


def reference_image(path: str, width: int, height: int):
    """The control image of a sample (--ci, edit models), upright and RGB, resized to the sample's size."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB").resize((width, height), Image.LANCZOS)


def load_qwen_image_vae(file: str | None, folder, arch) -> "AutoencoderKLQwenImage":
    """The Qwen-Image VAE (Qwen-Image's and Anima's): `file` (model.vae) when set, a diffusers VAE folder or a single
    file (ComfyUI's qwen_image_vae.safetensors: the Wan-2.1 layout, or diffusers' names) read with the `arch`
    folder's vae config; else the vae/ of the diffusers `folder`."""
    from pathlib import Path

    from diffusers import AutoencoderKLQwenImage

    from library.loading import read_checkpoint
    from library.qwen_image_layout import file_to_vae

    if not file:
        return AutoencoderKLQwenImage.from_pretrained(str(folder), subfolder="vae")
    if Path(file).is_dir():
        return AutoencoderKLQwenImage.from_pretrained(str(file))
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(str(Path(arch) / "vae")))
    assign_weights(vae, file_to_vae(read_checkpoint(file)), file)
    return vae


def qwen3_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen3 text-encoder file (transformers' causal-LM names `model.layers...` as ComfyUI's qwen_3_4b and
    qwen_3_06b_base, or the base model's `layers...`) in Qwen3Model's names; the LM head (tied to the embedding,
    unused) is left out."""
    return {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("lm_head.")}


def rebuild_qwen3_rotary(qwen) -> None:
    """A Qwen3Model's rotary inverse frequencies (a non-persistent buffer, left on the meta device when the model
    was built there) rebuilt as its own __init__ computes them."""
    rotary = qwen.rotary_emb
    if rotary.inv_freq.is_meta:
        with torch.device("cpu"):
            fresh = type(rotary)(qwen.config)
        for name, buffer in fresh.named_buffers():
            rotary.register_buffer(name, buffer, persistent=False)
