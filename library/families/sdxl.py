"""Stable Diffusion XL: two text encoders (CLIP-L, and OpenCLIP bigG with its pooled projection), a
UNet2DConditionModel conditioned on both encoders' penultimate layers plus the pooled text and the
size/crop micro-conditioning ("add_time_ids"), trained with eps- or v-prediction on the DDPM schedule,
and the SDXL VAE (which overflows in fp16: NaN latents, black images).

Loads a diffusers folder (local, or a hub id the user named) or a single file in the SAI layout
(`model.diffusion_model.`, `first_stage_model.`, `conditioner.embedders.0.transformer.` (CLIP-L),
`conditioner.embedders.1.model.` (OpenCLIP bigG)) with the architecture config shipped in
library/arch/sdxl, offline.

clip_skip: SDXL already conditions on the penultimate layer of both encoders; clip_skip = 1 (the
default) is that, and each step above 1 goes one more layer back in both encoders, as diffusers'
pipeline counts it (its clip_skip = ours - 1). sd-scripts ignores clip_skip for SDXL.

The size conditioning of each example comes from the batch (`original_size` (h, w), `crop_top_left`
(top, left), `target_size` (h, w), as the data pipeline records them); where a batch has none, the
image is taken as uncropped at the trained size (latent size x the VAE factor).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from library import long_prompts
from library.families.base import (AdapterTarget, Components, ModelFamily, ModelSource, is_single_file,
                                   register)
from library.loading import (CheckpointError, arch_dir, arch_problem, has_key_prefix, load_clip_tokenizer,
                             read_checkpoint, read_json, shipped_archs)
from library.objectives import DiffusionObjective

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_G_PREFIX = "conditioner.embedders.1.model."
DEFAULT_TOKENIZERS = "stabilityai/stable-diffusion-xl-base-1.0"  # tokenizer/ and tokenizer_2/, from the cache
PIPELINE_CLASS = "StableDiffusionXLPipeline"
TEXT_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
FP16_VAE_WARNING = (
    "the SDXL VAE is running in fp16: the original SDXL VAE overflows in fp16 (NaN latents, black images). "
    "Set train.no_half_vae = true (keeps the VAE in fp32), or use an fp16-fixed VAE (model.vae)")


class SDXLFamily(ModelFamily):
    name = "sdxl"
    block_classes = ("BasicTransformerBlock", "ResnetBlock2D")  # FSDP2 shards each as a unit
    text_encoder_folders = {"text_encoder": "te1", "text_encoder_2": "te2"}  # diffusers subfolder -> our name
    adapter_base_versions = ("sdxl_base_v1-0", "sdxl_base_v0-9")
    folder_parts = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")  # the subfolders _load_folder reads

    def file_metadata(self, parts: Components) -> dict[str, str]:
        """What kohya/modelspec metadata says about the base model (sd-scripts' names)."""
        v = bool(parts.source and parts.source.v_parameterization)
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": str(v),
                "modelspec.architecture": "stable-diffusion-xl-v1-base"}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        return is_sdxl_checkpoint(path)

    def recognises(self, tensors) -> bool:
        """The SAI layout's OpenCLIP-G tower (as claims() reads it)."""
        return any(k.startswith(OPEN_CLIP_G_PREFIX) for k in tensors)

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        for prefix in (UNET_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_G_PREFIX):
            if not any(k.startswith(prefix) for k in tensors):
                return f"no '{prefix}*' keys: not an SDXL base checkpoint in the SAI layout"
        return arch_problem(detect_arch, tensors) if source.arch is None else None

    def load(self, source: ModelSource) -> Components:
        parts = self._load_single_file(source) if is_single_file(source.path) else self._load_folder(source)
        if source.vae:
            parts.vae = _load_vae(source.vae, arch_dir(source.arch or "sdxl"))
        parts.source = source
        return parts

    def _load_folder(self, source: ModelSource) -> Components:
        path = source.path
        return Components(
            denoiser=UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            text_encoders={"te1": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                           "te2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2")},
            tokenizers=_tokenizers(source.tokenizer or path),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
        )

    def _load_single_file(self, source: ModelSource) -> Components:
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

        checkpoint = read_checkpoint(source.path)
        for prefix in (UNET_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_G_PREFIX):
            if not any(k.startswith(prefix) for k in checkpoint):
                raise CheckpointError(f"{source.path}: no '{prefix}*' keys: not an SDXL base checkpoint in the "
                                      f"SAI layout")
        arch = arch_dir(source.arch) if source.arch else detect_arch(checkpoint)
        where = dict(config=str(arch), local_files_only=True)
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **where)
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **where)
        encoders = {}
        for name, cls, sub in (("te1", CLIPTextModel, "text_encoder"),
                               ("te2", CLIPTextModelWithProjection, "text_encoder_2")):
            encoders[name] = create_diffusers_clip_model_from_ldm(cls, checkpoint, subfolder=sub, **where)
            not_loaded = [n for n, p in encoders[name].named_parameters() if p.is_meta]
            if not_loaded:
                raise CheckpointError(f"{source.path}: {sub} does not match the architecture {arch.name}: "
                                      f"no weights for {not_loaded[:3]}")
        return Components(denoiser=unet, vae=vae, text_encoders=encoders,
                          tokenizers=_tokenizers(source.tokenizer or DEFAULT_TOKENIZERS),
                          noise_scheduler=DDPMScheduler.from_pretrained(str(arch), subfolder="scheduler"),
                          extra={"arch": str(arch)})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        from library.families.sd1 import kohya_block_index  # the same IN/MID/OUT numbering, 3 levels

        te1 = parts.text_encoders["te1"]
        return [
            AdapterTarget("denoiser", "lora_unet", linear_parents=("Transformer2DModel",),
                          conv_parents=("ResnetBlock2D", "Downsample2D", "Upsample2D"),
                          block_index=kohya_block_index, diffusers_prefix="unet",
                          kohya_names=lambda path: self.sai_module_path(parts, path)),
            AdapterTarget("te1", "lora_te1", linear_parents=TEXT_PARENTS,
                          kohya_path_prefix="" if hasattr(te1, "text_model") else "text_model.",
                          diffusers_prefix="text_encoder"),
            AdapterTarget("te2", "lora_te2", linear_parents=TEXT_PARENTS, diffusers_prefix="text_encoder_2"),
        ]

    def sai_module_path(self, parts: Components, module_path: str) -> str:
        """A U-Net module path as SAI / sd-scripts SDXL files name it: down_blocks.1.attentions.0.proj_in ->
        input_blocks.4.1.proj_in, down_blocks.0.resnets.0.conv1 -> input_blocks.1.0.in_layers.2, ..."""
        from library.ldm_layout import UNET_PREFIX as LDM_UNET, unet_to_ldm

        key = next(iter(unet_to_ldm({module_path + ".weight": torch.empty(0)}, dict(parts.denoiser.config))))
        return key[len(LDM_UNET):-len(".weight")]

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The whole model in the SAI single-file layout (what ComfyUI, A1111/Forge and sd-scripts load)."""
        from library.ldm_layout import sdxl_pipeline_to_ldm

        return sdxl_pipeline_to_ldm(parts.denoiser.state_dict(), dict(parts.denoiser.config), parts.vae.state_dict(),
                                    parts.text_encoders["te1"].state_dict(), parts.text_encoders["te2"].state_dict())

    # ---- the training step ----------------------------------------------------------------

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """encoder_hidden_states: both encoders' layer -(clip_skip + 1) (penultimate at 1), concatenated;
        text_embeds: the pooled, projected output of the second encoder (its last layer)."""
        if clip_skip > 1:
            _warn_once("clip_skip", f"SDXL with clip_skip = {clip_skip}: both text encoders condition on layer "
                       f"-{clip_skip + 1} ({clip_skip - 1} before SDXL's usual penultimate layer); sd-scripts "
                       f"ignores clip_skip for SDXL")
        hidden = []
        n = long_prompts.windows(parts)  # max_token_length 150 / 225: captions in 75-token windows
        for name in ("te1", "te2"):
            tokenizer, encoder = parts.tokenizers[name], parts.text_encoders[name]
            ids, weights = long_prompts.caption_ids(tokenizer, captions, n, long_prompts.weighted(parts))
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            states = long_prompts.weigh(out.hidden_states[-(clip_skip + 1)], weights)  # pooled output unweighted
            hidden.append(long_prompts.join_windows(states, n) if n > 1 else states)
        pooled = long_prompts.first_window(out.text_embeds, n) if n > 1 else out.text_embeds
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def conditioning_for_batch(self, parts: Components, batch: dict, conditioning: dict[str, torch.Tensor],
                               latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """The text conditioning plus each example's size conditioning (time_ids)."""
        sizes = [batch.get(key) for key in ("original_size", "crop_top_left", "target_size")]
        return {**conditioning, "time_ids": add_time_ids(*sizes, latents=latents, vae_factor=_vae_factor(parts))}

    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, in the VAE's own dtype (autocast off: no_half_vae means fp32)."""
        vae = parts.vae
        if vae.dtype == torch.float16:
            _warn_once("fp16_vae", FP16_VAE_WARNING)
        with torch.autocast(vae.device.type, enabled=False):
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        if vae.dtype == torch.float16 and not torch.isfinite(latents).all():
            raise FloatingPointError(f"NaN/inf latents: {FP16_VAE_WARNING}")
        return latents * vae.config.scaling_factor

    def objective(self, parts: Components) -> DiffusionObjective:
        v = parts.source.v_parameterization if parts.source else False
        return DiffusionObjective.from_scheduler(parts.noise_scheduler, v_parameterization=v)

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        time_ids = conditioning.get("time_ids")
        if time_ids is None:  # no batch sizes (e.g. a fixed evaluation): uncropped at the trained size
            time_ids = add_time_ids(latents=noisy_latents, vae_factor=_vae_factor(parts))
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids.to(noisy_latents.device)}
        return parts.denoiser(noisy_latents, timesteps, conditioning["encoder_hidden_states"],
                              added_cond_kwargs=added).sample

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None):
        from library.sampling import make_sampler, run_pipeline

        pipe = self.pipeline(parts, make_sampler(sampler, parts.noise_scheduler, self.objective(parts)))
        return run_pipeline(pipe, prompt, negative_prompt, width, height, steps, seed, guidance_scale,
                            clip_skip=clip_skip - 1 if clip_skip > 1 else None)  # diffusers counts from 0

    def pipeline(self, parts: Components, scheduler=None):
        """A diffusers StableDiffusionXLPipeline over the parts themselves (no copy)."""
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=parts.vae, text_encoder=parts.text_encoders["te1"], text_encoder_2=parts.text_encoders["te2"],
            tokenizer=parts.tokenizers["te1"], tokenizer_2=parts.tokenizers["te2"], unet=parts.denoiser,
            scheduler=scheduler or parts.noise_scheduler)


def add_time_ids(original_size=None, crop_top_left=None, target_size=None, *, latents: torch.Tensor,
                 vae_factor: int = 8) -> torch.Tensor:
    """(B, 6) float: original (h, w), crop (top, left), target (h, w) per example, as SDXL was trained.
    Each argument is (B, 2) (a tensor or a list of pairs) or None: the trained size (latents' size x
    vae_factor) for the sizes, (0, 0) for the crop."""
    n, device = latents.shape[0], latents.device
    trained = torch.tensor([latents.shape[-2] * vae_factor, latents.shape[-1] * vae_factor], dtype=torch.float32)

    def pairs(value, default: torch.Tensor) -> torch.Tensor:
        if value is None:
            return default.expand(n, 2)
        value = torch.as_tensor(value, dtype=torch.float32).reshape(-1, 2)
        if value.shape[0] != n:
            raise ValueError(f"size conditioning for {value.shape[0]} examples, batch has {n}")
        return value

    return torch.cat([pairs(original_size, trained), pairs(crop_top_left, torch.zeros(2)),
                      pairs(target_size, trained)], dim=1).to(device)


def _vae_factor(parts: Components) -> int:
    return 2 ** (len(parts.vae.config.block_out_channels) - 1)


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def is_sdxl_checkpoint(path: str) -> bool:
    """A diffusers folder of an SDXL pipeline, or a single file with the SAI layout's OpenCLIP-G tower."""
    p = Path(path)
    if is_single_file(path):
        return has_key_prefix(path, OPEN_CLIP_G_PREFIX)
    index = p / "model_index.json"
    if index.is_file():
        return read_json(index).get("_class_name") == PIPELINE_CLASS
    return (p / "text_encoder_2").is_dir() and (p / "unet").is_dir()


def detect_arch(checkpoint: dict[str, torch.Tensor]) -> Path:
    """The shipped SDXL-type architecture (two text encoders) whose U-Net matches the checkpoint's
    (in_channels, first width, cross-attention width)."""
    conv_in = checkpoint[UNET_PREFIX + "input_blocks.0.0.weight"]
    to_k = next(v for k, v in checkpoint.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    found = (conv_in.shape[1], conv_in.shape[0], to_k.shape[1])
    for arch in shipped_archs():
        if not (arch / "text_encoder_2").is_dir() or not (arch / "unet").is_dir():  # FLUX / SD3: no U-Net
            continue
        config = read_json(arch / "unet" / "config.json")
        if (config["in_channels"], config["block_out_channels"][0], config["cross_attention_dim"]) == found:
            return arch
    raise CheckpointError(
        f"no shipped SDXL architecture has a U-Net with (in_channels, first width, cross-attention dim) = {found}; "
        f"set model.arch to a folder of diffusers configs for this model")


def _tokenizers(where: str) -> dict:
    """tokenizer/ and tokenizer_2/ of a pipeline folder (or the cache of a hub id); a folder holding one
    CLIP tokenizer serves both (the second padding with "!", as SDXL's tokenizer_2)."""
    if (Path(where) / "tokenizer").is_dir() or not Path(where).is_dir():
        return {"te1": load_clip_tokenizer(where, "tokenizer", (DEFAULT_TOKENIZERS, "tokenizer")),
                "te2": load_clip_tokenizer(where, "tokenizer_2", (DEFAULT_TOKENIZERS, "tokenizer_2"))}
    first = load_clip_tokenizer(where, fetch=(DEFAULT_TOKENIZERS, "tokenizer"))
    second = load_clip_tokenizer(where, fetch=(DEFAULT_TOKENIZERS, "tokenizer_2"))
    second.pad_token = "!"
    return {"te1": first, "te2": second}


def _load_vae(path: str, arch: Path) -> AutoencoderKL:
    if Path(path).is_dir():
        return AutoencoderKL.from_pretrained(path)
    return AutoencoderKL.from_single_file(read_checkpoint(path), config=str(arch), subfolder="vae",
                                          local_files_only=True)


register(SDXLFamily())
