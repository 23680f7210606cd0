"""Stable Diffusion 3 / 3.5 (SD3-medium, SD3.5-medium, SD3.5-large): an SD3Transformer2DModel (MMDiT joint blocks;
SD3.5-medium adds a second image attention to its first 13 blocks, SD3.5 normalises q and k) over 16-channel
latents, conditioned on CLIP-L, CLIP-G and T5-XXL, trained with flow matching.

Loads a diffusers StableDiffusion3Pipeline folder, or what users have: the SAI single file
(`model.diffusion_model.joint_blocks.N...`, the VAE under `first_stage_model.`, the text encoders under
`text_encoders.clip_l / clip_g / t5xxl.transformer.` when the file includes them), with separate text-encoder files
(model.clip_l, model.clip_g, model.t5xxl; these win over the file's own) where it does not. The architecture comes
from the configs shipped in library/arch/sd3-medium, sd3.5-medium, sd3.5-large, picked by the checkpoint's shapes
(38 joint blocks: 3.5-large; 24 with `attn2`: 3.5-medium; 24 without: medium); model.arch overrides. The transformer
is converted by diffusers' own converter, offline. A CLIP-L without `text_projection` (the SAI files) gets the
identity, as diffusers' single-file loader and SAI's reference code give it. Tokenizers come from model.tokenizer (a
folder with tokenizer/, tokenizer_2/, tokenizer_3/) or the local cache of stabilityai/stable-diffusion-3-medium-
diffusers.

Conditioning is StableDiffusion3Pipeline.encode_prompt's: CLIP-L's and CLIP-G's penultimate hidden states
(clip_skip = 1; each step above goes one layer further back, the pipeline's clip_skip = ours - 1) concatenated
on channels, zero-padded to T5's width and followed by T5's tokens (model.t5xxl_max_token_length, default 256 as
sd-scripts); the pooled vector is both CLIPs' projected text embeddings, concatenated. apply_t5_attn_mask runs T5
with its padding mask and zeroes the padded outputs (as sd-scripts; the MMDiT itself takes no mask).

The objective is sd-scripts' sd3_train(_network).py: u drawn from weighting_scheme's density (uniform by
default; logit_normal, mode), shifted by training_shift = loss.discrete_flow_shift (default 1.0: no shift) as
u -> shift u / (1 + (shift - 1) u), timestep = floor(u (max - min) + min), s = timestep / 1000 (timestep_sampling
= "sigma"; the other samplings are FlowMatchObjective's); the output is preconditioned to an x_0 estimate
(x_s - s output, model_prediction_type = sigma_scaled) and regressed on the latents, weighted by weighting_scheme
(sigma_sqrt, cosmap; none by default). With model_prediction_type raw / additive the target is the velocity
noise - x_0. The transformer gets the timestep s * 1000 as StableDiffusion3Pipeline passes it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from library.families.base import (AdapterTarget, Components, ModelFamily, ModelSource, is_single_file,
                                   register)
from library.families.transformer_parts import (assign_weights, clip_keys, encode_latents, encode_t5,
                                                load_file_or_folder, t5_keys, t5_max_length)
from library.loading import CheckpointError, arch_dir, has_key_prefix, read_checkpoint, read_json
from library.objectives import FlowMatchObjective, density_sample, flow_shift
from library.sd3_layout import SAI_PREFIX, kohya_layout, sai_module_name, sai_to_transformer, transformer_to_sai

PIPELINE_CLASS = "StableDiffusion3Pipeline"
DEFAULT_TOKENIZERS = "stabilityai/stable-diffusion-3-medium-diffusers"
DEFAULT_T5_LENGTH = 256
TEXT_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
BLOCK_PARENTS = ("JointTransformerBlock",)
TEXT_PREFIX = "text_encoders.{}.transformer."  # clip_l, clip_g, t5xxl inside the SAI file
VAE_PREFIX = "first_stage_model."
ARCHITECTURES = {"sd3-medium": "stable-diffusion-v3-medium", "sd3.5-medium": "stable-diffusion-v3.5-medium",
                 "sd3.5-large": "stable-diffusion-v3.5-large"}


@dataclass
class Sd3FlowMatchObjective(FlowMatchObjective):
    """FlowMatchObjective with sd-scripts' SD3 defaults and rules (see the module docstring)."""
    discrete_flow_shift: float = 1.0  # sd-scripts' --training_shift

    def sample_timesteps(self, batch: int, generator: torch.Generator, latent_shape=None) -> torch.Tensor:
        if self.timestep_sampling != "sigma":
            return super().sample_timesteps(batch, generator, latent_shape)
        u = density_sample(self.weighting_scheme, batch, generator, self.logit_mean, self.logit_std, self.mode_scale)
        u = flow_shift(u, self.discrete_flow_shift)
        low = self.min_timestep
        high = self.max_timestep if self.max_timestep is not None else self.num_train_timesteps
        return (u * (high - low) + low).floor().float()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return latents if self.model_prediction_type == "sigma_scaled" else noise - latents


class Sd3Family(ModelFamily):
    name = "sd3"
    block_classes = ("JointTransformerBlock",)  # FSDP2 shards each as a unit
    xformers_attention = False  # joint attention runs on PyTorch SDPA
    text_encoder_folders = {"text_encoder": "te1", "text_encoder_2": "te2", "text_encoder_3": "te3"}
    adapter_base_versions = ("sd3",)
    folder_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                    "scheduler")  # the subfolders _load_folder reads

    def file_metadata(self, parts: Components) -> dict[str, str]:
        return {"ss_base_model_version": "sd3", "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.architecture": ARCHITECTURES[arch_name(parts.denoiser)]}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):
            return has_key_prefix(path, SAI_PREFIX + "joint_blocks.") or has_key_prefix(path, "joint_blocks.")
        index = Path(path) / "model_index.json"
        return index.is_file() and read_json(index).get("_class_name") == PIPELINE_CLASS

    def recognises(self, tensors) -> bool:
        return any(k.startswith((SAI_PREFIX + "joint_blocks.", "joint_blocks.")) for k in tensors)

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        if not source.vae and not any(k.startswith(VAE_PREFIX) for k in tensors):
            return "holds no VAE ('first_stage_model.*'); set model.vae to the SD3 VAE"
        missing = [key for key in ("clip_l", "clip_g", "t5xxl")
                   if not getattr(source, key) and not any(k.startswith(TEXT_PREFIX.format(key)) for k in tensors)]
        if missing:
            return (f"holds no {', '.join(missing)} text encoder(s); set " + ", ".join(f"model.{k}" for k in missing)
                    + " to the separate file(s)")
        return None

    def load(self, source: ModelSource) -> Components:
        parts = load_file_or_folder(source, self._load_single_file, self._load_folder)
        if source.vae:
            parts.vae = _load_vae(read_checkpoint(source.vae) if is_single_file(source.vae) else source.vae,
                                  arch_dir(source.arch or arch_name(parts.denoiser)))
        return parts

    def _load_folder(self, source: ModelSource) -> Components:
        path = source.path
        return Components(
            denoiser=SD3Transformer2DModel.from_pretrained(path, subfolder="transformer"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            text_encoders={"te1": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"),
                           "te2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
                           "te3": T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3")},
            tokenizers=_tokenizers(source.tokenizer or path),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"))

    def _load_single_file(self, source: ModelSource) -> Components:
        checkpoint = read_checkpoint(source.path)
        if not any(k.startswith((SAI_PREFIX + "joint_blocks.", "joint_blocks.")) for k in checkpoint):
            raise CheckpointError(f"{source.path}: no 'model.diffusion_model.joint_blocks.*' keys: not an SD3 "
                                  f"checkpoint in the SAI layout")
        state = sai_to_transformer(checkpoint)
        arch = arch_dir(source.arch) if source.arch else detect_arch(state, source.path)
        with torch.device("meta"):
            denoiser = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(str(arch / "transformer")))
        assign_weights(denoiser, state, source.path)
        if not any(k.startswith(VAE_PREFIX) for k in checkpoint) and not source.vae:
            raise CheckpointError(f"{source.path}: no VAE ('first_stage_model.*'); set model.vae to the SD3 VAE")
        vae = _load_vae(checkpoint, arch) if not source.vae else None  # load() puts model.vae in
        encoders = {}
        for name, key, sub, cls in (("te1", "clip_l", "text_encoder", CLIPTextModelWithProjection),
                                    ("te2", "clip_g", "text_encoder_2", CLIPTextModelWithProjection),
                                    ("te3", "t5xxl", "text_encoder_3", T5EncoderModel)):
            file = getattr(source, key)
            if file:
                weights, where = read_checkpoint(file), file
            else:
                prefix = TEXT_PREFIX.format(key)
                weights = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
                where = source.path
                if not weights:
                    raise CheckpointError(f"{source.path}: holds no {key} text encoder ('{prefix}*'); set "
                                          f"model.{key} to the separate file")
            config_cls = T5Config if cls is T5EncoderModel else CLIPTextConfig
            with torch.device("meta"):
                encoder = cls(config_cls.from_pretrained(str(arch / sub)))
            keys = (t5_keys(weights) if cls is T5EncoderModel
                    else clip_keys(weights, encoder, identity=key == "clip_l"))
            assign_weights(encoder, keys, where)
            encoders[name] = encoder
        return Components(denoiser=denoiser, vae=vae, text_encoders=encoders,
                          tokenizers=_tokenizers(source.tokenizer or DEFAULT_TOKENIZERS),
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"),
                          extra={"arch": str(arch)})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        """The Linear layers of the joint blocks (attention q/k/v/out of both streams and SD3.5-medium's second
        image attention, MLPs, adaLN modulations; sd-scripts' lora_sd3 set), CLIP-L and CLIP-G (T5 is not
        trained, as sd-scripts' default). Kohya files name the transformer's layers by the SAI modules, q, k, v
        fused into qkv (lora_unet_joint_blocks_0_x_block_attn_qkv), as sd-scripts writes them."""
        layers = parts.denoiser.config.num_layers
        names = functools.partial(sai_module_name, num_layers=layers)
        targets = [
            AdapterTarget("denoiser", "lora_unet", linear_parents=BLOCK_PARENTS, diffusers_prefix="transformer",
                          kohya_names=lambda path: names(path) or path,
                          kohya_layout=functools.partial(kohya_layout, num_layers=layers)),
            AdapterTarget("te1", "lora_te1", linear_parents=TEXT_PARENTS, diffusers_prefix="text_encoder"),
            AdapterTarget("te2", "lora_te2", linear_parents=TEXT_PARENTS, diffusers_prefix="text_encoder_2"),
        ]
        return targets

    def swappable_blocks(self, parts: Components) -> list[torch.nn.Module]:
        """The transformer blocks block swap may keep on the CPU between uses, in execution order."""
        return list(parts.denoiser.transformer_blocks)

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The transformer, the VAE and both CLIPs in the SAI single-file layout (what ComfyUI, Forge and
        sd-scripts load, with the t5xxl file beside it); T5-XXL, never trained here, is left out."""
        from library.ldm_layout import vae_to_ldm
        from library.memory import host_state_dict

        # built on the host: the layout fuses and reshapes (a second copy on the device otherwise)
        out = {SAI_PREFIX + k: v for k, v in transformer_to_sai(host_state_dict(parts.denoiser)).items()}
        out.update(vae_to_ldm(host_state_dict(parts.vae)))
        for name, key in (("te1", "clip_l"), ("te2", "clip_g")):
            out.update({TEXT_PREFIX.format(key) + k: v for k, v in host_state_dict(parts.text_encoders[name]).items()
                        if not k.endswith("position_ids")})
        return out

    # ---- the training step ----------------------------------------------------------------

    def t5_max_length(self, parts: Components) -> int:
        return t5_max_length(parts, DEFAULT_T5_LENGTH)

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int,
                       t5: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """prompt_embeds: (B, 77 + L, T5 width): both CLIPs' layer -(clip_skip + 1), concatenated and zero-padded
        to T5's width, then T5's last hidden state; pooled_prompt_embeds: both CLIPs' text_embeds, concatenated.
        `t5`: encode_apart's output for these captions (cached while the CLIPs train), else T5 runs now."""
        hidden, pooled = [], []
        for name in ("te1", "te2"):
            encoder, tokenizer = parts.text_encoders[name], parts.tokenizers[name]
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out.text_embeds)
            hidden.append(out.hidden_states[-(clip_skip + 1)])
        clip = torch.cat(hidden, dim=-1)
        t5_hidden = (t5 if t5 is not None else self.encode_apart(parts, captions))["t5_hidden"]
        clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
        return {"prompt_embeds": torch.cat([clip, t5_hidden.to(clip.device, clip.dtype)], dim=-2),
                "pooled_prompt_embeds": torch.cat(pooled, dim=-1)}

    cached_apart = "te3"  # T5: cached while CLIP-L / CLIP-G train (sd-scripts' partial text-encoder cache)

    def encode_apart(self, parts: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """T5's share of encode_prompts: its last hidden state, padding zeroed with the mask."""
        return {"t5_hidden": encode_t5(parts, captions, self.t5_max_length(parts))[0]}


    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_latents(parts, pixels, generator)

    def objective(self, parts: Components) -> Sd3FlowMatchObjective:
        return Sd3FlowMatchObjective(num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps)

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        device = noisy_latents.device
        return parts.denoiser(hidden_states=noisy_latents, timestep=timesteps.to(device, torch.float32),
                              encoder_hidden_states=conditioning["prompt_embeds"].to(device),
                              pooled_projections=conditioning["pooled_prompt_embeds"].to(device)).sample

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None):
        """Flow-matching Euler steps (the sampler name does not apply) with classifier-free guidance
        (guidance_scale, negative_prompt); `guidance` (distilled guidance) does not apply to SD3."""
        pipe = self.pipeline(parts)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt, negative_prompt=negative_prompt or None, width=width, height=height,
                    num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                    max_sequence_length=self.t5_max_length(parts),
                    clip_skip=clip_skip - 1 if clip_skip > 1 else None).images[0]

    def pipeline(self, parts: Components, scheduler=None):
        """A diffusers StableDiffusion3Pipeline over the parts themselves (no copy)."""
        from diffusers import StableDiffusion3Pipeline

        te, tok = parts.text_encoders, parts.tokenizers
        return StableDiffusion3Pipeline(
            transformer=parts.denoiser, scheduler=scheduler or parts.noise_scheduler, vae=parts.vae,
            text_encoder=te["te1"], tokenizer=tok["te1"], text_encoder_2=te["te2"], tokenizer_2=tok["te2"],
            text_encoder_3=te["te3"], tokenizer_3=tok["te3"])


def arch_name(denoiser) -> str:
    """The shipped architecture a transformer's config is (by depth and dual attention)."""
    config = denoiser.config
    if config.num_layers == 38:
        return "sd3.5-large"
    return "sd3.5-medium" if config.dual_attention_layers else "sd3-medium"


def detect_arch(state: dict[str, torch.Tensor], path) -> Path:
    """The shipped architecture of a converted transformer state dict: 38 joint blocks: SD3.5-large; 24 with a
    second image attention (attn2): SD3.5-medium; 24 without: SD3-medium."""
    depth = len({k.split(".")[1] for k in state if k.startswith("transformer_blocks.")})
    dual = any(".attn2." in k for k in state)
    name = {(38, False): "sd3.5-large", (24, True): "sd3.5-medium", (24, False): "sd3-medium"}.get((depth, dual))
    if name is None:
        raise CheckpointError(f"{path}: {depth} joint blocks{' with dual attention' if dual else ''}: not a shipped "
                              f"SD3 architecture (sd3-medium, sd3.5-medium, sd3.5-large); set model.arch to a "
                              f"folder of diffusers configs")
    return arch_dir(name)


def _load_vae(where, arch: Path) -> AutoencoderKL:
    """The VAE from a diffusers folder, or from a state dict in the original layout (with or without
    "first_stage_model.")."""
    if isinstance(where, (str, Path)):
        return AutoencoderKL.from_pretrained(str(where))
    return AutoencoderKL.from_single_file(where, config=str(arch), subfolder="vae", local_files_only=True)


def _tokenizers(where: str) -> dict:
    """SD3's three tokenizers (tokenizer/, tokenizer_2/, tokenizer_3/) from `where`, the cache, or fetched once
    from the SD3 repo (library.loading.load_tokenizer)."""
    from transformers import CLIPTokenizer

    from library.loading import load_tokenizer

    return {name: load_tokenizer(where, (sub,), (DEFAULT_TOKENIZERS, sub), what, cls)
            for name, sub, what, cls in (("te1", "tokenizer", "SD3 CLIP-L", CLIPTokenizer),
                                         ("te2", "tokenizer_2", "SD3 CLIP-G", CLIPTokenizer),
                                         ("te3", "tokenizer_3", "SD3 T5", None))}


register(Sd3Family())
