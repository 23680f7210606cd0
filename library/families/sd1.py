"""Stable Diffusion 1.x and 2.x: one CLIP text encoder (CLIP-L for SD1, OpenCLIP-H for SD2), a
UNet2DConditionModel trained with eps- or v-prediction on the DDPM schedule, the SD VAE.

Loads a diffusers folder (local, or a hub id the user named) or a single file in the original layout,
with the architecture configs shipped in library/arch (sd15, sd2), offline.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from library import long_prompts
from library.families.base import (AdapterTarget, Components, ModelFamily, ModelSource, is_single_file,
                                   register)
from library.loading import (CheckpointError, arch_dir, arch_problem, has_key_prefix, load_clip_tokenizer,
                             read_checkpoint, read_json, shipped_archs)
from library.objectives import DiffusionObjective

UNET_PREFIX = "model.diffusion_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
CLIP_PREFIX = "cond_stage_model.transformer."
DEFAULT_TOKENIZERS = {"clip": "openai/clip-vit-large-patch14", "open_clip": "stabilityai/stable-diffusion-2-1"}


def _fetch(kind: str) -> tuple[str, str]:
    """The hub repo and subfolder a missing tokenizer of this kind is fetched from (loading.load_tokenizer)."""
    return DEFAULT_TOKENIZERS[kind], "tokenizer" if kind == "open_clip" else ""


class SD1Family(ModelFamily):
    name = "sd1"
    block_classes = ("BasicTransformerBlock", "ResnetBlock2D")  # FSDP2 shards each as a unit
    text_encoder_folders = {"text_encoder": "te"}  # diffusers subfolder -> our name
    adapter_base_versions = ("sd_v1", "sd_v2")
    folder_parts = ("unet", "vae", "text_encoder", "scheduler")  # the subfolders _load_folder reads

    def file_metadata(self, parts: Components) -> dict[str, str]:
        """What kohya/modelspec metadata says about the base model."""
        v2, v = parts.extra["v2"], parts.source.v_parameterization
        arch = ("stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1"
        return {"ss_base_model_version": "sd_v2" if v2 else "sd_v1", "ss_v2": str(v2),
                "ss_v_parameterization": str(v), "modelspec.architecture": arch}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):  # keys are checked in load(); SAI-layout (SDXL) files are not ours
            return not has_key_prefix(path, "conditioner.embedders.")
        index = Path(path) / "model_index.json"
        return not index.is_file() or read_json(index).get("_class_name") == "StableDiffusionPipeline"

    def recognises(self, tensors) -> bool:
        """An LDM U-Net (input_blocks) without SDXL's conditioner.embedders."""
        return (any(k.startswith(UNET_PREFIX + "input_blocks.") for k in tensors)
                and not any(k.startswith("conditioner.embedders.") for k in tensors))

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        if not any(k.startswith((CLIP_PREFIX, OPEN_CLIP_PREFIX)) for k in tensors):
            return f"no text-encoder keys ('{CLIP_PREFIX}' or '{OPEN_CLIP_PREFIX}')"
        return arch_problem(detect_arch, tensors) if source.arch is None else None

    def load(self, source: ModelSource) -> Components:
        if is_single_file(source.path):
            parts = self._load_single_file(source)
        else:
            parts = self._load_folder(source)
        if source.vae:
            parts.vae = _load_vae(source.vae, arch_dir(source.arch or ("sd2" if parts.extra["v2"] else "sd15")))
        parts.source = source
        return parts

    def _load_folder(self, source: ModelSource) -> Components:
        path = source.path
        te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
        return Components(
            denoiser=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            text_encoders={"te": te},
            tokenizers={"te": load_clip_tokenizer(source.tokenizer or path,
                                                  None if source.tokenizer else "tokenizer",
                                                  _fetch("open_clip" if source.v2 or te.config.hidden_act == "gelu"
                                                         else "clip"))},
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
            extra={"v2": source.v2 or te.config.hidden_act == "gelu"},
        )

    def _load_single_file(self, source: ModelSource) -> Components:
        checkpoint = read_checkpoint(source.path)
        if not any(k.startswith(UNET_PREFIX) for k in checkpoint):
            raise CheckpointError(f"{source.path}: no '{UNET_PREFIX}*' keys: not an SD1/SD2 checkpoint")
        arch = arch_dir(source.arch) if source.arch else detect_arch(checkpoint)
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(arch), subfolder="unet",
                                                     local_files_only=True)
        vae = AutoencoderKL.from_single_file(checkpoint, config=str(arch), subfolder="vae", local_files_only=True)
        te, kind = _text_encoder_from_checkpoint(checkpoint, arch, source.path)
        tokenizer = load_clip_tokenizer(source.tokenizer or DEFAULT_TOKENIZERS[kind],  # a folder: it or its tokenizer/
                                        ("", "tokenizer") if source.tokenizer else _fetch(kind)[1], _fetch(kind))
        scheduler = DDPMScheduler.from_pretrained(str(arch), subfolder="scheduler")
        return Components(denoiser=unet, vae=vae, text_encoders={"te": te}, tokenizers={"te": tokenizer},
                          noise_scheduler=scheduler, extra={"arch": str(arch), "v2": kind == "open_clip"})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        te = parts.text_encoders["te"]
        return [
            AdapterTarget("denoiser", "lora_unet", linear_parents=("Transformer2DModel",),
                          conv_parents=("ResnetBlock2D", "Downsample2D", "Upsample2D"),
                          block_index=kohya_block_index, diffusers_prefix="unet"),
            AdapterTarget("te", "lora_te", linear_parents=("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
                          kohya_path_prefix="" if hasattr(te, "text_model") else "text_model.",
                          diffusers_prefix="text_encoder"),
        ]

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The whole model in the original single-file layout (what UIs load)."""
        from library.ldm_layout import pipeline_to_ldm

        return pipeline_to_ldm(parts.denoiser.state_dict(), dict(parts.denoiser.config), parts.vae.state_dict(),
                               parts.text_encoders["te"].state_dict(), "open_clip" if parts.extra["v2"] else "clip")

    # ---- the training step ----------------------------------------------------------------

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        tokenizer, encoder = parts.tokenizers["te"], parts.text_encoders["te"]
        n = long_prompts.windows(parts)  # max_token_length 150 / 225: captions in 75-token windows
        ids, weights = long_prompts.caption_ids(tokenizer, captions, n, long_prompts.weighted(parts))
        ids = ids.to(encoder.device)
        if clip_skip == 1:
            hidden = encoder(ids).last_hidden_state
        else:
            out = encoder(ids, output_hidden_states=True)
            final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
            hidden = final_norm(out.hidden_states[-clip_skip])
        hidden = long_prompts.weigh(hidden, weights)  # weighted_captions: each token's state times its weight
        return {"encoder_hidden_states": long_prompts.join_windows(hidden, n) if n > 1 else hidden}


    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        vae = parts.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        return latents * vae.config.scaling_factor

    def objective(self, parts: Components) -> DiffusionObjective:
        v = parts.source.v_parameterization if parts.source else False
        return DiffusionObjective.from_scheduler(parts.noise_scheduler, v_parameterization=v)

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        return parts.denoiser(noisy_latents, timesteps, conditioning["encoder_hidden_states"]).sample

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None):
        from library.sampling import make_sampler, run_pipeline

        pipe = self.pipeline(parts, make_sampler(sampler, parts.noise_scheduler, self.objective(parts)))
        return run_pipeline(pipe, prompt, negative_prompt, width, height, steps, seed, guidance_scale,
                            clip_skip=clip_skip - 1 if clip_skip > 1 else None)  # diffusers counts from 0

    def pipeline(self, parts: Components, scheduler=None):
        """A diffusers StableDiffusionPipeline over the parts themselves (no copy)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders["te"], tokenizer=parts.tokenizers["te"],
            unet=parts.denoiser, scheduler=scheduler or parts.noise_scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)


_UPDOWN = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")


def kohya_block_index(module_path: str) -> int | None:
    """sd-scripts' block of a U-Net layer: 0-11 = IN00-IN11 (IN00, conv_in, has no adapter), 12 = MID,
    13-24 = OUT00-OUT11; level i, item j of a down/up block is 3 i + j (its sampler 3 i + 2), plus 1
    for down blocks and 13 for up blocks."""
    m = _UPDOWN.match(module_path)
    if m:
        side, level, kind, item = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        index = 3 * level + (2 if kind.endswith("samplers") else item)
        return 1 + index if side == "down" else 13 + index
    return 12 if module_path.startswith("mid_block.") else None



def detect_arch(checkpoint: dict[str, torch.Tensor]) -> Path:
    """The shipped architecture whose U-Net matches the checkpoint's first conv and cross-attention widths."""
    found = _unet_signature(checkpoint)
    for arch in shipped_archs():
        if (arch / "text_encoder_2").is_dir() or not (arch / "unet").is_dir():  # SDXL's, or a transformer's
            continue
        config = read_json(arch / "unet" / "config.json")
        expected = (config["in_channels"], config["block_out_channels"][0], config["cross_attention_dim"])
        if expected == found:
            return arch
    raise CheckpointError(
        f"no shipped architecture has a U-Net with (in_channels, first width, cross-attention dim) = {found}; "
        f"set model.arch to a folder of diffusers configs for this model")


def _unet_signature(checkpoint) -> tuple[int, int, int]:
    conv_in = checkpoint[UNET_PREFIX + "input_blocks.0.0.weight"]
    to_k = next(v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    return conv_in.shape[1], conv_in.shape[0], to_k.shape[1]


def _text_encoder_from_checkpoint(checkpoint, arch: Path, path: str):
    """diffusers' own conversion of the CLIP-L (SD1) or OpenCLIP-H (SD2) text tower of a single file."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    if any(k.startswith(OPEN_CLIP_PREFIX) for k in checkpoint):
        kind = "open_clip"
    elif any(k.startswith(CLIP_PREFIX) for k in checkpoint):
        kind = "clip"
    else:
        raise CheckpointError(f"{path}: no text-encoder keys ('{CLIP_PREFIX}' or '{OPEN_CLIP_PREFIX}')")
    model = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, config=str(arch),
                                                 subfolder="text_encoder", local_files_only=True)
    not_loaded = [n for n, p in model.named_parameters() if p.is_meta]
    if not_loaded:
        raise CheckpointError(f"{path}: text encoder does not match the architecture {arch.name}: "
                              f"no weights for {not_loaded[:3]}")
    return model, kind


def _load_vae(path: str, arch: Path) -> AutoencoderKL:
    if Path(path).is_dir():
        return AutoencoderKL.from_pretrained(path)
    checkpoint = read_checkpoint(path)
    return AutoencoderKL.from_single_file(checkpoint, config=str(arch), subfolder="vae", local_files_only=True)


register(SD1Family())
