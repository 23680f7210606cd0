"""Chroma (lodestones' Chroma1-HD / chroma-unlocked, 8.9B): FLUX.1-schnell with its modulation Linears pruned,
every block's shift / scale / gate coming from one MLP, the approximator (diffusers' ChromaTransformer2DModel,
19 double- and 38 single-stream blocks over 2x2-packed 16-channel latents). Conditioned on T5-XXL alone (no
CLIP-L, no pooled vector, no guidance input), trained with flow matching like FLUX.1.

The T5 attention mask is always part of Chroma's recipe (diffusers' ChromaPipeline, ComfyUI, sd-scripts): T5 runs
with the tokenizer's padding mask, and in the transformer's joint attention every text token after the first
padding token is masked out (the caption and one padding token are seen).

Loads a diffusers folder (ChromaPipeline), or what users have: the Chroma transformer single file (BFL names plus
`distilled_guidance_layer.`, with or without `model.diffusion_model.`; library.chroma_layout) with separate
`t5xxl` and `ae` files (model.t5xxl, model.ae), the architecture shipped in library/arch/chroma, offline.
sd-scripts selects it with flux_train_network's `model_type = "chroma"` (read as model.family here).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from transformers import T5Config, T5EncoderModel

from library.chroma_layout import APPROXIMATOR, file_to_transformer, is_chroma_key, transformer_to_file
from library.families.base import (AdapterTarget, Components, ModelFamily, ModelSource, is_single_file,
                                   register)
from library.families.transformer_parts import (assign_weights, encode_latents, latent_image_ids, load_ae,
                                                load_file_or_folder, missing_files_problem, pack_latents, t5_keys,
                                                t5_max_length, unpack_latents)
from library.flux_layout import kohya_layout
from library.loading import arch_dir, has_key_prefix, read_checkpoint, read_json
from library.objectives import FlowMatchObjective

PIPELINE_CLASS = "ChromaPipeline"
DEFAULT_TOKENIZER = "lodestones/Chroma1-HD"
BLOCK_PARENTS = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")
SEPARATE_FILES = ("t5xxl", "ae")


class ChromaFamily(ModelFamily):
    name = "chroma"
    block_classes = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock")  # FSDP2 shards each as a unit
    xformers_attention = False  # joint attention runs on PyTorch SDPA
    text_encoder_folders = {"text_encoder": "te3"}  # diffusers subfolder -> our name
    cached_apart = None  # T5 alone, never trained: its outputs are cached whole or not at all
    adapter_base_versions = ("chroma",)
    folder_parts = ("transformer", "vae", "text_encoder", "scheduler")

    def file_metadata(self, parts: Components) -> dict[str, str]:
        return {"ss_base_model_version": "chroma", "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.architecture": "chroma"}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):
            return any(has_key_prefix(path, prefix + APPROXIMATOR) for prefix in ("", "model.diffusion_model."))
        index = Path(path) / "model_index.json"
        return index.is_file() and read_json(index).get("_class_name") == PIPELINE_CLASS

    def recognises(self, tensors) -> bool:
        return any(is_chroma_key(k) for k in tensors)

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        return missing_files_problem(source, SEPARATE_FILES, "a Chroma transformer file")

    def load(self, source: ModelSource) -> Components:
        return load_file_or_folder(source, self._load_single_file, self._load_folder, self.single_file_problem)

    def _load_folder(self, source: ModelSource) -> Components:
        path = source.path
        vae = load_ae(source.ae, arch_dir("chroma")) if source.ae else AutoencoderKL.from_pretrained(
            path, subfolder="vae")
        return Components(
            denoiser=ChromaTransformer2DModel.from_pretrained(path, subfolder="transformer"), vae=vae,
            text_encoders={"te3": T5EncoderModel.from_pretrained(path, subfolder="text_encoder")},
            tokenizers=_tokenizers(source.tokenizer or path),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"))

    def _load_single_file(self, source: ModelSource) -> Components:
        arch = arch_dir(source.arch or "chroma")
        with torch.device("meta"):
            denoiser = ChromaTransformer2DModel.from_config(
                ChromaTransformer2DModel.load_config(str(arch / "transformer")))
            t5 = T5EncoderModel(T5Config.from_pretrained(str(arch / "text_encoder")))
        _rebuild_buffers(denoiser)
        assign_weights(denoiser, file_to_transformer(read_checkpoint(source.path)), source.path)
        assign_weights(t5, t5_keys(read_checkpoint(source.t5xxl)), source.t5xxl)
        return Components(denoiser=denoiser, vae=load_ae(source.ae, arch), text_encoders={"te3": t5},
                          tokenizers=_tokenizers(source.tokenizer or DEFAULT_TOKENIZER),
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"),
                          extra={"arch": str(arch)})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        """The transformer blocks' Linears, named in files as FLUX.1's (lora_unet_double_blocks_0_img_attn_qkv:
        ComfyUI maps Chroma's LoRA keys with FLUX.1's map); T5 is not trained (as in sd-scripts)."""
        return [AdapterTarget("denoiser", "lora_unet", linear_parents=BLOCK_PARENTS, diffusers_prefix="transformer",
                              kohya_layout=kohya_layout)]

    def swappable_blocks(self, parts: Components) -> list[torch.nn.Module]:
        """The blocks train.blocks_to_swap may keep in CPU memory, in execution order: double-, then single-stream."""
        return [*parts.denoiser.transformer_blocks, *parts.denoiser.single_transformer_blocks]

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The transformer in the single-file layout ComfyUI / sd-scripts load beside t5xxl and ae."""
        return transformer_to_file(parts.denoiser.state_dict())

    # ---- the training step ----------------------------------------------------------------

    def t5_max_length(self, parts: Components) -> int:
        return t5_max_length(parts, 512)

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """prompt_embeds: T5's last hidden state (B, L, 4096), T5 run with the padding mask (as ChromaPipeline);
        t5_attention_mask: the tokens the transformer sees (the caption and its first padding token).
        clip_skip does not apply."""
        t5, tokenizer = parts.text_encoders["te3"], parts.tokenizers["te3"]
        tokens = tokenizer(captions, padding="max_length", max_length=self.t5_max_length(parts), truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(t5.device)
        hidden = t5(tokens.input_ids.to(t5.device), attention_mask=mask).last_hidden_state
        positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        return {"prompt_embeds": hidden, "t5_attention_mask": positions <= mask.sum(dim=1, keepdim=True)}


    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_latents(parts, pixels, generator)

    def objective(self, parts: Components) -> FlowMatchObjective:
        return FlowMatchObjective(num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps)

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        b, c, h, w = noisy_latents.shape
        device = noisy_latents.device
        text = conditioning["prompt_embeds"].to(device)
        image = torch.ones(b, (h // 2) * (w // 2), dtype=torch.bool, device=device)
        joint = torch.cat([conditioning["t5_attention_mask"].to(device, torch.bool), image], dim=1)
        out = parts.denoiser(hidden_states=pack_latents(noisy_latents), encoder_hidden_states=text,
                             timestep=timesteps.to(device, torch.float32) / 1000,
                             img_ids=latent_image_ids(h, w, device),
                             txt_ids=torch.zeros(text.shape[1], 3, device=device), attention_mask=joint).sample
        return unpack_latents(out, h, w)

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None):
        """Flow-matching Euler steps with classifier-free guidance (Chroma has no distilled guidance: `guidance`
        does not apply; the sampler name does not either). The pipeline gets the prompts as encode_prompts gives
        them, with the boolean mask training uses (ChromaPipeline's own encoding hands the transformer a 0/1
        float mask, which SDPA adds to the scores instead of masking)."""
        pipe = self.pipeline(parts)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu").manual_seed(seed)
        positive, negative = (self.encode_prompts(parts, [text], 1) for text in (prompt, negative_prompt))
        return pipe(prompt_embeds=positive["prompt_embeds"], prompt_attention_mask=positive["t5_attention_mask"],
                    negative_prompt_embeds=negative["prompt_embeds"],
                    negative_prompt_attention_mask=negative["t5_attention_mask"], width=width, height=height,
                    num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]

    def pipeline(self, parts: Components, scheduler=None):
        """A diffusers ChromaPipeline over the parts themselves (no copy)."""
        from diffusers import ChromaPipeline

        return ChromaPipeline(scheduler=scheduler or parts.noise_scheduler, vae=parts.vae,
                              text_encoder=parts.text_encoders["te3"], tokenizer=parts.tokenizers["te3"],
                              transformer=parts.denoiser)


def _rebuild_buffers(denoiser: ChromaTransformer2DModel) -> None:
    """The approximator's input table (a non-persistent buffer, left on the meta device) rebuilt as its own
    __init__ computes it."""
    embed = denoiser.time_text_embed
    if embed.mod_proj.is_meta:
        from diffusers.models.embeddings import get_timestep_embedding

        out_dim, width = embed.mod_proj.shape
        embed.register_buffer("mod_proj", get_timestep_embedding(torch.arange(out_dim) * 1000, width,
                                                                 flip_sin_to_cos=True, downscale_freq_shift=0),
                              persistent=False)


def _tokenizers(where: str) -> dict:
    """Chroma's T5 tokenizer (tokenizer/) from `where`, the cache, or fetched once from the Chroma repo."""
    from library.loading import load_tokenizer

    return {"te3": load_tokenizer(where, ("tokenizer",), (DEFAULT_TOKENIZER, "tokenizer"), "Chroma T5")}


register(ChromaFamily())
