"""FLUX.1 (dev, schnell): a FluxTransformer2DModel (19 double-stream and 38 single-stream blocks) over 2x2-packed
16-channel latents, conditioned on T5-XXL token embeddings and the pooled CLIP-L output, trained with flow
matching (library.objectives.FlowMatchObjective, sd-scripts' FLUX defaults); FLUX.1-dev also takes the
distilled guidance value (model.guidance_scale) through its guidance embedding.

Loads a diffusers folder, or what users have: the BFL transformer single file (`double_blocks.N...`, with or
without `model.diffusion_model.`) plus separate `clip_l`, `t5xxl` and `ae` files (model.clip_l, model.t5xxl,
model.ae), with the architecture configs shipped in library/arch/flux-dev and flux-schnell (picked by the
presence of the guidance embedding; model.arch overrides), offline. Tokenizers come from model.tokenizer (a
folder with tokenizer/ and tokenizer_2/) or the local cache of black-forest-labs/FLUX.1-dev.

The transformer is called as diffusers' FluxPipeline calls it: latents packed (B, h/2 * w/2, 4C), image ids
(0, row, column) per packed position, text ids zero, timestep s (= t / 1000).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from library.families.base import (AdapterTarget, Components, ModelFamily, ModelSource, is_single_file,
                                   register)
from library.families.transformer_parts import (assign_weights, clip_keys, encode_latents, encode_t5,  # noqa: F401
                                                latent_image_ids, load_ae, load_file_or_folder, missing_files_problem,
                                                pack_latents, reference_image, t5_keys, t5_max_length, unpack_latents)
from library.chroma_layout import APPROXIMATOR, is_chroma_key
from library.flux2_layout import MARKER as FLUX2_MARKER, is_flux2_key
from library.flux_layout import bfl_to_transformer, kohya_layout, transformer_to_bfl
from library.loading import arch_dir, has_key_prefix, read_checkpoint, read_json
from library.objectives import FlowMatchObjective

BFL_PREFIX = "model.diffusion_model."
PIPELINE_CLASS = "FluxPipeline"
DEFAULT_TOKENIZERS = "black-forest-labs/FLUX.1-dev"
TEXT_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
BLOCK_PARENTS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


class FluxFamily(ModelFamily):
    name = "flux"
    block_classes = ("FluxTransformerBlock", "FluxSingleTransformerBlock")  # FSDP2 shards each as a unit
    xformers_attention = False  # joint attention runs on PyTorch SDPA
    distilled_guidance = True  # guidance is an input of the transformer: no classifier-free guidance batch
    text_encoder_folders = {"text_encoder": "te1", "text_encoder_2": "te3"}  # diffusers subfolder -> our name
    adapter_base_versions = ("flux1",)
    takes_control_images = True  # FLUX.1 Kontext edit pairs (control_directory)
    folder_parts = ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")  # the subfolders _load_folder reads

    def file_metadata(self, parts: Components) -> dict[str, str]:
        dev = bool(parts.denoiser.config.guidance_embeds)
        return {"ss_base_model_version": "flux1", "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.architecture": "flux-1-dev" if dev else "flux-1-schnell"}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):
            return ((has_key_prefix(path, "double_blocks.") or has_key_prefix(path, BFL_PREFIX + "double_blocks."))
                    and not any(has_key_prefix(path, p + marker) for p in ("", BFL_PREFIX)
                                for marker in (APPROXIMATOR, FLUX2_MARKER)))
        index = Path(path) / "model_index.json"
        return index.is_file() and read_json(index).get("_class_name") in (PIPELINE_CLASS, "FluxKontextPipeline")

    def recognises(self, tensors) -> bool:
        return (any(k.startswith(("double_blocks.", BFL_PREFIX + "double_blocks.")) for k in tensors)
                and not any(is_chroma_key(k) or is_flux2_key(k) for k in tensors))  # Chroma's, FLUX.2's: same names

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        return missing_files_problem(source, ("clip_l", "t5xxl", "ae"), "a FLUX.1 transformer file")

    def load(self, source: ModelSource) -> Components:
        parts = load_file_or_folder(source, self._load_single_file, self._load_folder, self.single_file_problem)
        if source.ae and not is_single_file(source.path):
            parts.vae = load_ae(source.ae, arch_dir(source.arch or _arch_name(parts.denoiser)))
        return parts

    def _load_folder(self, source: ModelSource) -> Components:
        path = source.path
        return Components(
            denoiser=FluxTransformer2DModel.from_pretrained(path, subfolder="transformer"),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae"),
            text_encoders={"te1": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
                           "te3": T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2")},
            tokenizers=_tokenizers(source.tokenizer or path),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"))

    def _load_single_file(self, source: ModelSource) -> Components:
        state = bfl_to_transformer(read_checkpoint(source.path))
        arch = arch_dir(source.arch) if source.arch else arch_dir(
            "flux-dev" if "time_text_embed.guidance_embedder.linear_1.weight" in state else "flux-schnell")
        with torch.device("meta"):
            denoiser = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(arch / "transformer")))
        assign_weights(denoiser, state, source.path)
        with torch.device("meta"):
            clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(arch / "text_encoder")))
            t5 = T5EncoderModel(T5Config.from_pretrained(str(arch / "text_encoder_2")))
        assign_weights(clip, clip_keys(read_checkpoint(source.clip_l), clip), source.clip_l)
        assign_weights(t5, t5_keys(read_checkpoint(source.t5xxl)), source.t5xxl)
        return Components(denoiser=denoiser, vae=load_ae(source.ae, arch), text_encoders={"te1": clip, "te3": t5},
                          tokenizers=_tokenizers(source.tokenizer or DEFAULT_TOKENIZERS),
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"),
                          extra={"arch": str(arch)})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        te1 = parts.text_encoders["te1"]
        return [
            AdapterTarget("denoiser", "lora_unet", linear_parents=BLOCK_PARENTS, diffusers_prefix="transformer",
                          kohya_layout=kohya_layout),
            AdapterTarget("te1", "lora_te1", linear_parents=TEXT_PARENTS,
                          kohya_path_prefix="" if hasattr(te1, "text_model") else "text_model.",
                          diffusers_prefix="text_encoder"),
        ]

    def swappable_blocks(self, parts: Components) -> list[torch.nn.Module]:
        """The blocks train.blocks_to_swap may keep in CPU memory, in execution order: double-, then single-stream."""
        return [*parts.denoiser.transformer_blocks, *parts.denoiser.single_transformer_blocks]

    def blocks_to_swap(self, parts: Components, count: int) -> list[torch.nn.Module]:
        """The blocks train.blocks_to_swap = count keeps in CPU memory, as sd-scripts counts them for FLUX.1
        (a double block weighs about two single blocks): count // 2 double blocks and (count - count // 2) * 2
        single blocks, each kind evenly spread, in execution order. More than the model has swaps them all."""
        from library.block_swap import spread

        doubles, singles = list(parts.denoiser.transformer_blocks), list(parts.denoiser.single_transformer_blocks)
        n_double = min(count // 2, len(doubles))
        n_single = min((count - count // 2) * 2, len(singles))
        return ([doubles[k] for k in spread(len(doubles), n_double)] if n_double else []) + (
            [singles[k] for k in spread(len(singles), n_single)] if n_single else [])

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The transformer in the BFL layout (what ComfyUI / Forge / sd-scripts load beside clip_l, t5xxl, ae)."""
        from library.memory import host_state_dict

        return transformer_to_bfl(host_state_dict(parts.denoiser))  # fused on the host

    def separate_files(self, parts: Components) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
        """Text encoders the single file leaves out, as the separate files UIs load beside it: component ->
        (file name, weights). CLIP-L in transformers' names with `text_model.` (ComfyUI's clip_l.safetensors)."""
        clip = parts.text_encoders["te1"]
        prefix = "" if hasattr(clip, "text_model") else "text_model."
        return {"te1": ("clip_l", {prefix + k: v for k, v in clip.state_dict().items()
                                   if not k.endswith("position_ids")})}

    # ---- the training step ----------------------------------------------------------------

    def t5_max_length(self, parts: Components) -> int:
        return t5_max_length(parts, 512 if parts.denoiser.config.guidance_embeds else 256)  # dev / schnell

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int,
                       t5: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """prompt_embeds: T5's last hidden state (B, L, 4096); pooled_prompt_embeds: CLIP-L's pooled output;
        with apply_t5_attn_mask, t5_attention_mask (predict() masks the padding out of the joint attention).
        clip_skip does not apply (FLUX uses CLIP-L's pooled output only). `t5`: encode_apart's output for
        these captions (cached while CLIP-L trains), else T5 runs now."""
        clip, clip_tok = parts.text_encoders["te1"], parts.tokenizers["te1"]
        ids = clip_tok(captions, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        t5 = t5 if t5 is not None else self.encode_apart(parts, captions)
        return {**{k: v.to(pooled.device) for k, v in t5.items()}, "pooled_prompt_embeds": pooled}

    cached_apart = "te3"  # T5: cached while CLIP-L trains (sd-scripts' partial text-encoder cache)

    def encode_apart(self, parts: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """T5's share of encode_prompts: prompt_embeds (and t5_attention_mask with apply_t5_attn_mask)."""
        hidden, mask = encode_t5(parts, captions, self.t5_max_length(parts))
        return {"prompt_embeds": hidden} if mask is None else {"prompt_embeds": hidden, "t5_attention_mask": mask}

    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_latents(parts, pixels, generator)

    def objective(self, parts: Components) -> FlowMatchObjective:
        return FlowMatchObjective(num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps)

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        model = parts.denoiser
        b, c, h, w = noisy_latents.shape
        device = noisy_latents.device
        text = conditioning["prompt_embeds"].to(device)
        guidance = None
        if model.config.guidance_embeds:
            scale = parts.source.guidance_scale if parts.source else 3.5
            guidance = torch.full((b,), scale, device=device, dtype=torch.float32)
        tokens, ids = pack_latents(noisy_latents), latent_image_ids(h, w, device)
        n = tokens.shape[1]
        if "control_latents" in conditioning:  # Kontext: reference tokens after the image's, ids (1, row, column)
            tokens, ids = with_reference(tokens, ids, conditioning["control_latents"].to(device, tokens.dtype))
        attention = None
        if "t5_attention_mask" in conditioning:  # apply_t5_attn_mask: text padding masked out of the joint attention
            image = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=device)
            joint = torch.cat([conditioning["t5_attention_mask"].to(device, torch.bool), image], dim=1)
            attention = {"attention_mask": joint[:, None, None, :]}
        out = model(hidden_states=tokens, encoder_hidden_states=text,
                    pooled_projections=conditioning["pooled_prompt_embeds"].to(device),
                    timestep=timesteps.to(device, torch.float32) / 1000, img_ids=ids,
                    txt_ids=torch.zeros(text.shape[1], 3, device=device), guidance=guidance,
                    joint_attention_kwargs=attention).sample
        return unpack_latents(out[:, :n], h, w)

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None, control_image: str | None = None):
        """Flow-matching Euler steps (the sampler name does not apply); `guidance` (--g) is FLUX.1-dev's
        distilled guidance, default model.guidance_scale. No CFG: negative prompts are not used. With a
        control image (--ci, FLUX.1 Kontext), diffusers' FluxKontextPipeline over the same parts, the image at
        the sample's size as the reference."""
        pipe = self.pipeline(parts) if control_image is None else self.kontext_pipeline(parts)
        pipe.set_progress_bar_config(disable=True)
        if guidance is None:
            guidance = parts.source.guidance_scale if parts.source else 3.5
        generator = torch.Generator("cpu").manual_seed(seed)
        reference = {} if control_image is None else {"image": reference_image(control_image, width, height),
                                                      "_auto_resize": False}
        return pipe(prompt=prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
                    generator=generator, max_sequence_length=self.t5_max_length(parts), **reference).images[0]

    def kontext_pipeline(self, parts: Components, scheduler=None):
        """A diffusers FluxKontextPipeline over the parts themselves (no copy)."""
        from diffusers import FluxKontextPipeline

        return FluxKontextPipeline(**self.pipeline(parts, scheduler).components)

    def pipeline(self, parts: Components, scheduler=None):
        """A diffusers FluxPipeline over the parts themselves (no copy)."""
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=scheduler or parts.noise_scheduler, vae=parts.vae,
                            text_encoder=parts.text_encoders["te1"], tokenizer=parts.tokenizers["te1"],
                            text_encoder_2=parts.text_encoders["te3"], tokenizer_2=parts.tokenizers["te3"],
                            transformer=parts.denoiser)


def with_reference(tokens: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor):
    """FLUX.1 Kontext's input: the packed reference latents (B, C, h', w') appended to the image tokens along the
    sequence, their position ids (1, row, column), as FluxKontextPipeline builds them; the prediction is read
    from the first (image) tokens only."""
    _, _, rh, rw = reference.shape
    reference_ids = latent_image_ids(rh, rw, ids.device)
    reference_ids[:, 0] = 1
    return torch.cat([tokens, pack_latents(reference)], dim=1), torch.cat([ids, reference_ids], dim=0)


def _arch_name(denoiser) -> str:
    return "flux-dev" if denoiser.config.guidance_embeds else "flux-schnell"


def _tokenizers(where: str) -> dict:
    """FLUX.1's CLIP-L (tokenizer/) and T5 (tokenizer_2/) tokenizers from `where`, the cache, or fetched once from
    the FLUX.1 repo (library.loading.load_tokenizer)."""
    from transformers import CLIPTokenizer

    from library.loading import load_tokenizer

    return {"te1": load_tokenizer(where, ("tokenizer",), (DEFAULT_TOKENIZERS, "tokenizer"), "FLUX.1 CLIP-L",
                                  CLIPTokenizer),
            "te3": load_tokenizer(where, ("tokenizer_2",), (DEFAULT_TOKENIZERS, "tokenizer_2"), "FLUX.1 T5")}


register(FluxFamily())
