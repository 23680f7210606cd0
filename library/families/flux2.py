"""FLUX.2 (klein 4B, klein 9B, dev): a Flux2Transformer2DModel (double- and single-stream blocks with shared
modulations) over the 32-channel latents of AutoencoderKLFlux2, patchified 2x2 to 128 channels and normalised by
the VAE's batch-norm statistics, conditioned on a language model's hidden states, trained with flow matching.

The text-conditioning recipe is diffusers' Flux2 pipelines': klein (Flux2KleinPipeline) renders each caption as a
Qwen3 chat turn (enable_thinking off), pads it to 512 tokens, runs Qwen3 with the padding mask and stacks the
hidden states of layers 9, 18 and 27 along the channels; dev (Flux2Pipeline) renders it with BFL's system message
for Mistral-Small-3.x and stacks layers 10, 20 and 30. The transformer sees every text token (no mask), with
position ids (0, 0, 0, token); image tokens have (0, row, column, 0), reference (edit) tokens (10, row, column, 0)
after the image's. dev has the distilled guidance input (model.guidance_scale); klein has none.

Latents here are what the transformer reads: (B, 128, H/16, W/16), as Flux2 pipelines' _patchify_latents and
batch-norm give them, so noise is drawn, and the loss computed, in that space.

Loads a diffusers folder (Flux2KleinPipeline / Flux2Pipeline), or what users have: the BFL transformer file
(flux-2-klein-4b.safetensors, ComfyUI's diffusion_models/ files, fp8 ones too) with the text encoder file
(model.text_encoder: ComfyUI's text_encoders/qwen_3_4b.safetensors, ...) and the autoencoder (model.ae: the
original layout, or a diffusers folder / file), the architecture shipped in library/arch/flux2-klein-4b, -9b, -dev
(recognised by the text width of the transformer's txt_in; model.arch overrides), offline.
"""
from __future__ import annotations

from pathlib import Path

import torch

from library.families.base import AdapterTarget, Components, ModelFamily, ModelSource, is_single_file, register
from library.families.transformer_parts import (assign_weights, load_file_or_folder, missing_files_problem,
                                                reference_image)
from library.flux2_layout import MARKER, file_to_transformer, is_flux2_key, kohya_layout, transformer_to_file
from library.loading import CheckpointError, arch_dir, has_key_prefix, read_checkpoint, read_json
from library.objectives import FlowMatchObjective

PIPELINES = ("Flux2KleinPipeline", "Flux2Pipeline")
BLOCK_PARENTS = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")
SEPARATE_FILES = ("text_encoder", "ae")
MAX_TOKENS = 512  # the pipelines' max_sequence_length
REFERENCE_TIME = 10  # the first position id of reference tokens (Flux2 pipelines' _prepare_image_ids scale)
# text width of txt_in (3 x the encoder's hidden size) -> shipped architecture
ARCH_BY_TEXT_WIDTH = {7680: "flux2-klein-4b", 12288: "flux2-klein-9b", 15360: "flux2-dev"}
DEFAULT_TOKENIZERS = {"flux2-klein-4b": "black-forest-labs/FLUX.2-klein-4B",
                      "flux2-klein-9b": "black-forest-labs/FLUX.2-klein-9B",
                      "flux2-dev": "black-forest-labs/FLUX.2-dev"}


class Flux2Family(ModelFamily):
    name = "flux2"
    block_classes = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")  # FSDP2 shards each as a unit
    xformers_attention = False  # joint attention runs on PyTorch SDPA
    text_encoder_folders = {"text_encoder": "te"}  # diffusers subfolder -> our name
    cached_apart = None  # one frozen text encoder: its outputs are cached whole or not at all
    adapter_base_versions = ("flux2",)
    takes_control_images = True  # edit pairs (control_directory): reference tokens
    folder_parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def file_metadata(self, parts: Components) -> dict[str, str]:
        arch = _arch_of(parts.denoiser).replace("flux2", "flux-2")
        return {"ss_base_model_version": "flux2", "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.architecture": arch}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):
            return any(has_key_prefix(path, prefix + MARKER) for prefix in ("", "model.diffusion_model."))
        index = Path(path) / "model_index.json"
        return index.is_file() and read_json(index).get("_class_name") in PIPELINES

    def recognises(self, tensors) -> bool:
        return any(is_flux2_key(k) for k in tensors)

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        problem = missing_files_problem(source, SEPARATE_FILES, "a FLUX.2 transformer file")
        if problem:
            return problem
        width = next((t.shape[1] for k, t in tensors.items() if k.removeprefix("model.diffusion_model.")
                      == "txt_in.weight"), None)
        if width is not None and width not in ARCH_BY_TEXT_WIDTH and not source.arch:
            return (f"its txt_in takes {width} text channels, which no shipped FLUX.2 architecture has "
                    f"({', '.join(f'{a}: {w}' for w, a in ARCH_BY_TEXT_WIDTH.items())}); set model.arch")
        return None

    def load(self, source: ModelSource) -> Components:
        return load_file_or_folder(source, self._load_single_file, self._load_folder, self.single_file_problem)

    def _load_folder(self, source: ModelSource) -> Components:
        import transformers
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        path = Path(source.path)
        index = read_json(path / "model_index.json")
        encoder_class = getattr(transformers, index["text_encoder"][1])
        denoiser = Flux2Transformer2DModel.from_pretrained(str(path), subfolder="transformer")
        vae = load_vae(source.ae, arch_dir(_arch_of(denoiser))) if source.ae else AutoencoderKLFlux2.from_pretrained(
            str(path), subfolder="vae")
        return Components(
            denoiser=denoiser, vae=vae,
            text_encoders={"te": encoder_class.from_pretrained(str(path), subfolder="text_encoder")},
            tokenizers={"te": _tokenizer(source.tokenizer or str(path), _arch_of(denoiser))},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(path), subfolder="scheduler"),
            extra={"is_distilled": bool(index.get("is_distilled", False))})

    def _load_single_file(self, source: ModelSource) -> Components:
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

        state = file_to_transformer(dequantized(read_checkpoint(source.path)))
        name = source.arch or ARCH_BY_TEXT_WIDTH.get(state["context_embedder.weight"].shape[1])
        if name is None:
            text = {"txt_in.weight": state["context_embedder.weight"]}
            raise CheckpointError(f"{source.path}: {self.single_file_problem(text, source)}")
        arch = arch_dir(name)
        with torch.device("meta"):
            config = Flux2Transformer2DModel.load_config(str(arch / "transformer"))
            denoiser = Flux2Transformer2DModel.from_config(config)
        assign_weights(denoiser, state, source.path)
        return Components(denoiser=denoiser, vae=load_vae(source.ae, arch),
                          text_encoders={"te": load_text_encoder(source.text_encoder, arch)},
                          tokenizers={"te": _tokenizer(source.tokenizer or DEFAULT_TOKENIZERS.get(name, str(arch)),
                                                       _arch_of(denoiser))},
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"),
                          extra={"arch": str(arch)})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        """The blocks' Linears, named in files by their BFL names (lora_unet_double_blocks_0_img_attn_qkv,
        lora_unet_single_blocks_0_linear1: ComfyUI's key map and diffusers' Flux2 kohya converter); the text
        encoder is not trained."""
        return [AdapterTarget("denoiser", "lora_unet", linear_parents=BLOCK_PARENTS, diffusers_prefix="transformer",
                              kohya_layout=kohya_layout)]

    def swappable_blocks(self, parts: Components) -> list[torch.nn.Module]:
        """The blocks train.blocks_to_swap may keep in CPU memory, in execution order: double-, then single-stream."""
        return [*parts.denoiser.transformer_blocks, *parts.denoiser.single_transformer_blocks]

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The transformer in the BFL layout ComfyUI and diffusers' from_single_file load."""
        from library.memory import host_state_dict

        return transformer_to_file(host_state_dict(parts.denoiser))

    # ---- the training step ----------------------------------------------------------------

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """prompt_embeds (B, 512, 3 x hidden): the text encoder's hidden states of three layers, stacked per token,
        as the variant's diffusers pipeline computes them. clip_skip does not apply."""
        encoder, tokenizer = parts.text_encoders["te"], parts.tokenizers["te"]
        dev = _is_dev(parts.denoiser)
        tokens = _chat_tokens(tokenizer, captions, dev)
        mask = tokens.attention_mask.to(encoder.device)
        out = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                      output_hidden_states=True, use_cache=False)
        stacked = torch.stack([out.hidden_states[k] for k in ((10, 20, 30) if dev else (9, 18, 27))], dim=2)
        return {"prompt_embeds": stacked.reshape(stacked.shape[0], stacked.shape[1], -1)}

    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> (B, 128, H/16, W/16): VAE latents patchified 2x2 and normalised by the VAE's
        batch-norm statistics, as Flux2 pipelines' _encode_vae_image."""
        vae = parts.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        b, c, h, w = latents.shape
        patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean, std = _latent_statistics(vae, patches)
        return (patches - mean) / std

    def decode_latents(self, parts: Components, latents: torch.Tensor) -> torch.Tensor:
        """encode_images' latents (B, 128, h, w) -> images in [-1, 1]: denormalised, unpatchified to the VAE's
        32 channels at twice the size, decoded (the Flux2 pipelines' _unpatchify_latents, then the VAE)."""
        vae = parts.vae
        mean, std = _latent_statistics(vae, latents)
        patches = latents * std + mean
        b, c, h, w = patches.shape
        unpacked = patches.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return vae.decode(unpacked.to(vae.device, vae.dtype)).sample

    def objective(self, parts: Components) -> "Flux2FlowMatchObjective":
        return Flux2FlowMatchObjective(num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps)

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        model = parts.denoiser
        b, c, h, w = noisy_latents.shape
        device = noisy_latents.device
        text = conditioning["prompt_embeds"].to(device)
        tokens, ids = noisy_latents.reshape(b, c, h * w).transpose(1, 2), latent_ids(h, w, 0, device)
        if "control_latents" in conditioning:  # edit pairs: reference tokens after the image's
            reference = conditioning["control_latents"].to(device, tokens.dtype)
            rh, rw = reference.shape[-2:]
            tokens = torch.cat([tokens, reference.reshape(b, c, rh * rw).transpose(1, 2)], dim=1)
            ids = torch.cat([ids, latent_ids(rh, rw, REFERENCE_TIME, device)])
        guidance = None
        if model.config.guidance_embeds:
            scale = parts.source.guidance_scale if parts.source else 4.0
            guidance = torch.full((b,), scale, device=device, dtype=torch.float32)
        text_ids = torch.zeros(text.shape[1], 4, device=device, dtype=torch.long)
        text_ids[:, 3] = torch.arange(text.shape[1], device=device)
        out = model(hidden_states=tokens, encoder_hidden_states=text, img_ids=ids, txt_ids=text_ids, guidance=guidance,
                    timestep=timesteps.to(device, torch.float32) / 1000).sample
        return out[:, :h * w].transpose(1, 2).reshape(b, c, h, w)

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None, control_image: str | None = None):
        """The variant's diffusers pipeline over the parts (its Euler steps and empirical timestep shift; the
        sampler name does not apply), with the prompts encoded as training encodes them. klein: classifier-free
        guidance with guidance_scale and the negative prompt (not for the step-distilled klein); dev: the
        distilled guidance input `guidance` (--g, default model.guidance_scale). With a control image (--ci),
        the image at the sample's size is the reference."""
        pipe = self.pipeline(parts)
        pipe.set_progress_bar_config(disable=True)
        embeds = {"prompt_embeds": self.encode_prompts(parts, [prompt], clip_skip)["prompt_embeds"]}
        if _is_dev(parts.denoiser):
            scale = guidance if guidance is not None else (parts.source.guidance_scale if parts.source else 4.0)
        else:
            scale = guidance_scale
            embeds["negative_prompt_embeds"] = self.encode_prompts(parts, [negative_prompt], clip_skip)["prompt_embeds"]
        reference = {} if control_image is None else {"image": reference_image(control_image, width, height)}
        return pipe(**embeds, **reference, width=width, height=height, num_inference_steps=steps,
                    guidance_scale=scale, generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    def pipeline(self, parts: Components, scheduler=None):
        """The variant's diffusers pipeline (Flux2KleinPipeline, Flux2Pipeline) over the parts themselves (no copy)."""
        from diffusers import Flux2KleinPipeline, Flux2Pipeline

        common = dict(scheduler=scheduler or parts.noise_scheduler, vae=parts.vae, transformer=parts.denoiser,
                      text_encoder=parts.text_encoders["te"], tokenizer=parts.tokenizers["te"])
        if _is_dev(parts.denoiser):
            return Flux2Pipeline(**common)
        return Flux2KleinPipeline(**common, is_distilled=parts.extra.get("is_distilled", False))


class Flux2FlowMatchObjective(FlowMatchObjective):
    """FlowMatchObjective on FLUX.2's patchified latents: one token per latent position, so flux_shift's sequence
    length is h x w (FLUX.1's packing halves each side first)."""

    def sample_timesteps(self, batch: int, generator: torch.Generator, latent_shape=None) -> torch.Tensor:
        if latent_shape is not None:
            latent_shape = (*latent_shape[:-2], 2 * latent_shape[-2], 2 * latent_shape[-1])
        return super().sample_timesteps(batch, generator, latent_shape)


def latent_ids(h: int, w: int, time: int, device) -> torch.Tensor:
    """(h w, 4): (time, row, column, 0) of each latent position, as Flux2 pipelines' _prepare_latent_ids (time 0)
    and _prepare_image_ids (references: time 10)."""
    rows = torch.arange(h, device=device).view(-1, 1).expand(h, w)
    cols = torch.arange(w, device=device).view(1, -1).expand(h, w)
    return torch.stack([torch.full_like(rows, time), rows, cols, torch.zeros_like(rows)], dim=-1).reshape(-1, 4)


def _latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def _chat_tokens(tokenizer, captions: list[str], dev: bool) -> dict:
    """The captions as the pipelines tokenize them: klein one Qwen3 user turn each, dev BFL's system message and a
    user turn (diffusers' format_input); padded and truncated to 512 tokens."""
    pad = dict(padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    if dev:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        return tokenizer.apply_chat_template(format_input(prompts=captions), add_generation_prompt=False,
                                             tokenize=True, return_dict=True, **pad)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False) for c in captions]
    return tokenizer(texts, **pad)


def _is_dev(denoiser) -> bool:
    return bool(denoiser.config.guidance_embeds)


def _arch_of(denoiser) -> str:
    return ARCH_BY_TEXT_WIDTH.get(denoiser.config.joint_attention_dim, "flux2-dev" if _is_dev(denoiser)
                                  else "flux2-klein-4b")


def dequantized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint with float8 weights (ComfyUI's fp8 files; "fp8_scaled" ones with a scale_weight per weight)
    in bfloat16, the scales applied; scale_input keys and the scaled_fp8 marker dropped. Other tensors as they are."""
    out = {}
    for key, value in state.items():
        if key.endswith(("scale_weight", "scale_input", "scaled_fp8")):  # scaled_fp8: ComfyUI's marker tensor
            continue
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = state.get(key.removesuffix("weight") + "scale_weight")
            value = value.to(torch.bfloat16) * (scale.to(torch.bfloat16) if scale is not None else 1)
        out[key] = value
    return out


def load_text_encoder(path: str, arch: Path):
    """The text encoder from a single file (transformers names, with or without the `model.` / language-model
    prefixes ComfyUI's and Hugging Face's files carry): the architecture's language model (Qwen3Model,
    MistralModel), which gives the hidden states the recipe reads; an lm_head or vision tower is not needed."""
    import transformers

    if Path(path).is_dir():
        config = transformers.AutoConfig.from_pretrained(path)
        return getattr(transformers, config.architectures[0]).from_pretrained(path)
    config = transformers.AutoConfig.from_pretrained(str(arch / "text_encoder"))
    text_config = getattr(config, "text_config", config)
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(text_config)
    prefixes = ("model.language_model.", "language_model.model.", "language_model.", "model.")
    state = {}
    for key, value in dequantized(read_checkpoint(path)).items():
        if key.startswith(("lm_head.", "vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                           "model.multi_modal_projector.")):
            continue
        state[next((key[len(p):] for p in prefixes if key.startswith(p)), key)] = value
    _rebuild_rotary(model)
    assign_weights(model, state, path)
    return model


def _rebuild_rotary(model) -> None:
    """The rotary embedding's inverse frequencies (non-persistent buffers, left on the meta device), as its own
    __init__ computes them."""
    rotary = model.rotary_emb
    if rotary.inv_freq.is_meta:
        fresh = type(rotary)(config=model.config)
        rotary.register_buffer("inv_freq", fresh.inv_freq, persistent=False)
        rotary.original_inv_freq = fresh.inv_freq


def load_vae(path: str, arch: Path):
    """AutoencoderKLFlux2 from a diffusers folder, or a single file in diffusers' names or the original (ldm)
    layout, with its batch-norm statistics (bn.running_mean / running_var), read with the architecture's config."""
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if Path(path).is_dir():
        return AutoencoderKLFlux2.from_pretrained(path)
    config = AutoencoderKLFlux2.load_config(str(arch / "vae"))
    with torch.device("meta"):
        vae = AutoencoderKLFlux2.from_config(config)
    state = dequantized(read_checkpoint(path))
    if not any(k.startswith("encoder.down_blocks.") for k in state):  # the original layout
        statistics = {k: v for k, v in state.items() if k.startswith("bn.")}
        state = {**convert_ldm_vae_checkpoint(state, config), **statistics}
    assign_weights(vae, state, path)
    return vae


def _tokenizer(where: str, variant: str):
    """The variant's tokenizer (klein: Qwen3's, dev: Mistral's) from `where`'s tokenizer/, the cache, or fetched
    once from the variant's repo (library.loading.load_tokenizer)."""
    from library.loading import load_tokenizer

    return load_tokenizer(where, ("tokenizer",), (DEFAULT_TOKENIZERS[variant], "tokenizer"), f"FLUX.2 {variant}")



register(Flux2Family())
