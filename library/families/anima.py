"""Anima (circlestone-labs, 2B, anime): Cosmos-Predict2-2B's DiT (diffusers' CosmosTransformer3DModel: 28 blocks of
self-attention with 3-D RoPE, cross-attention to 1024-wide text states and a GELU MLP, adaLN with a low-rank
adaLN-LoRA) over 2x2 patches of the Qwen-Image VAE's 16-channel latents (normalized by its per-channel means and
deviations), conditioned on Qwen3-0.6B through the LLM adapter (diffusers' AnimaTextConditioner: the caption's T5
token ids, from T5-XXL's vocabulary, embedded as queries; self-attention with RoPE, cross-attention to Qwen3's last
hidden state, MLP; 6 blocks), trained with flow matching on the raw velocity.

The LLM adapter is part of the denoiser, as in the original checkpoint (`net.llm_adapter.*`) and sd-scripts' Anima
model: AnimaTransformer is the DiT with the adapter as its child `text_conditioner`, run inside its forward (a full
fine-tune trains it, one DDP forward covers both, the single file holds both). Text encoding stops at Qwen3 (what is
cached): its last hidden state of the caption, padding zeroed, and the caption's T5 token ids, each padded to 512,
as sd-scripts' anima strategy tokenizes; diffusers' AnimaTextEncoderStep gives the same states on the real tokens.

Loads a diffusers folder (AnimaModularPipeline's: transformer/, text_conditioner/, text_encoder/, vae/, tokenizer/,
t5_tokenizer/, scheduler/), or the split files ComfyUI users have: the DiT file with the adapter inside
(`diffusion_models/anima-*.safetensors`, library.anima_layout) with model.text_encoder (Qwen3-0.6B,
`text_encoders/qwen_3_06b_base.safetensors`) and model.vae (`vae/qwen_image_vae.safetensors`), the architecture
shipped in library/arch/anima, offline. Tokenizers: model.tokenizer (a folder with tokenizer/ and t5_tokenizer/) or
the local caches of circlestone-labs/Anima-Base-v1.0-Diffusers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel,
                       FlowMatchEulerDiscreteScheduler)
from transformers import Qwen3Config, Qwen3Model

from library.anima_layout import (ADAPTER_MARK, CONDITIONER, adapter_file_keys, file_to_parts, is_dit_key,
                                   original_name, transformer_to_file)
from library.families.base import AdapterTarget, Components, ModelFamily, ModelSource, is_single_file, register
from library.families.transformer_parts import (assign_weights, load_file_or_folder, load_qwen_image_vae,
                                                missing_files_problem, qwen3_keys, rebuild_qwen3_rotary)
from library.loading import CheckpointError, arch_dir, has_key_prefix, read_checkpoint, read_json

PIPELINE_CLASS = "AnimaModularPipeline"
DEFAULT_TOKENIZER = "circlestone-labs/Anima-Base-v1.0-Diffusers"
T5_TOKENIZER = "google/t5-v1_1-xxl"  # the vocabulary of the adapter's ids (sd-scripts bundles its tokenizer)
SEPARATE_FILES = ("text_encoder", "vae")
TEXT_LENGTH = 512  # sd-scripts' qwen3_max_token_length and t5_max_token_length; the adapter's output length
# the Linears sd-scripts' lora_anima adapts by default: attention and MLP of each block (its default exclusion
# pattern drops the adaLN modulation, norms, embedders and the final layer); with train_llm_adapter, every Linear
# of the LLM adapter's blocks too (lora_anima's LLMAdapterTransformerBlock: self- and cross-attention, MLP)
BLOCK_PARENTS = ("Attention", "FeedForward", "AnimaTextConditionerBlock")


class AnimaTransformer(CosmosTransformer3DModel):
    """CosmosTransformer3DModel with the LLM adapter as its child `text_conditioner`: given the caption's T5 ids
    (t5_ids), encoder_hidden_states are Qwen3's states and go through the adapter first (as sd-scripts' Anima runs
    llm_adapter inside its forward); without them, the plain Cosmos call (the modular pipeline's)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, *args, text_mask=None, t5_ids=None,
                t5_mask=None, **kwargs):
        if t5_ids is not None:
            encoder_hidden_states = self.text_conditioner(encoder_hidden_states, t5_ids, t5_mask, text_mask)
        return super().forward(hidden_states, timestep, encoder_hidden_states, *args, **kwargs)


def _torchvision_free_padding_mask() -> None:
    """diffusers' Cosmos transformer resizes its padding mask with torchvision's transforms (imported only when
    torchvision is installed, which neither diffusers nor this trainer requires): without it, the same nearest
    resize (torchvision's tensor path is torch's nearest interpolation) is given to that module."""
    from diffusers.models.transformers import transformer_cosmos

    if hasattr(transformer_cosmos, "transforms"):
        return

    def resize(mask, size, interpolation=None):
        return torch.nn.functional.interpolate(mask, size=list(size), mode="nearest")

    functional = type("functional", (), {"resize": staticmethod(resize)})
    transformer_cosmos.transforms = type("transforms", (), {
        "functional": functional, "InterpolationMode": type("InterpolationMode", (), {"NEAREST": "nearest"})})


_torchvision_free_padding_mask()


class AnimaFamily(ModelFamily):
    name = "anima"
    block_classes = ("CosmosTransformerBlock",)  # FSDP2 shards each as a unit
    xformers_attention = False  # Cosmos' own attention processors run on PyTorch SDPA
    text_encoder_folders = {"text_encoder": "te"}
    cached_apart = None  # one text encoder, never trained: its outputs are cached whole or not at all
    adapter_base_versions = ("anima",)
    folder_parts = ("transformer", "text_conditioner", "vae", "text_encoder", "scheduler")
    has_llm_adapter = True

    def file_metadata(self, parts: Components) -> dict[str, str]:
        return {"ss_base_model_version": "anima", "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.architecture": "anima"}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):
            return any(has_key_prefix(path, p + "blocks.0.adaln_modulation_cross_attn.")
                       for p in ("", "net.", "model.diffusion_model.", "diffusion_model."))
        index = Path(path) / "modular_model_index.json"
        return index.is_file() and read_json(index).get("_class_name") == PIPELINE_CLASS

    def recognises(self, tensors) -> bool:
        return any(is_dit_key(k) for k in tensors)

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        return missing_files_problem(source, SEPARATE_FILES, "an Anima DiT file")

    def load(self, source: ModelSource) -> Components:
        return load_file_or_folder(source, self._load_single_file, self._load_folder, self.single_file_problem)

    def _load_folder(self, source: ModelSource) -> Components:
        path = str(source.path)
        denoiser = AnimaTransformer.from_pretrained(path, subfolder="transformer")
        denoiser.text_conditioner = AnimaTextConditioner.from_pretrained(path, subfolder="text_conditioner")
        if source.llm_adapter:
            assign_weights(denoiser.text_conditioner, adapter_file_keys(read_checkpoint(source.llm_adapter)),
                           source.llm_adapter)
        vae = load_qwen_image_vae(source.vae, path, arch_dir("anima"))
        qwen = _load_qwen3(source.text_encoder, arch_dir("anima")) if source.text_encoder else \
            Qwen3Model.from_pretrained(path, subfolder="text_encoder")
        return Components(denoiser=denoiser, vae=vae, text_encoders={"te": qwen},
                          tokenizers=tokenizers(source, path),
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"))

    def _load_single_file(self, source: ModelSource) -> Components:
        arch = arch_dir(source.arch or "anima")
        dit, adapter = file_to_parts(read_checkpoint(source.path))
        if source.llm_adapter:
            adapter = adapter_file_keys(read_checkpoint(source.llm_adapter))
        elif not adapter:
            raise CheckpointError(f"{source.path}: holds no LLM adapter ({ADAPTER_MARK}); set model.llm_adapter to "
                                  f"its file (sd-scripts' llm_adapter_path)", key="model.llm_adapter")
        denoiser = empty_transformer(arch, sizes=None if source.arch else file_sizes(dit, adapter))
        assign_weights(denoiser, {**dit, **{CONDITIONER + k: v for k, v in adapter.items()}}, source.path)
        return Components(denoiser=denoiser, vae=load_qwen_image_vae(source.vae, None, arch),
                          text_encoders={"te": _load_qwen3(source.text_encoder, arch)},
                          tokenizers=tokenizers(source),
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"),
                          extra={"arch": str(arch)})

    def planning_parts(self, arch: Path) -> Components:
        """The architecture's parts with random weights on the current (the planner's fake) device, captions
        planned at 512 Qwen3 and 512 T5 tokens."""
        return Components(denoiser=empty_transformer(arch, meta=False),
                          vae=AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(str(arch / "vae"))),
                          text_encoders={"te": Qwen3Model(Qwen3Config.from_pretrained(str(arch / "text_encoder")))},
                          tokenizers={"te": _PlanningTokenizer(), "t5": _PlanningTokenizer()},
                          source=ModelSource(str(arch)), extra={"arch": str(arch)},
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"))

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        """The DiT blocks' attention (self and cross: q, k, v, output) and MLP Linears, as sd-scripts' lora_anima
        picks them by default (adaLN modulation, embedders and the final layer excluded), named in kohya files as
        the original checkpoint names them (lora_unet_blocks_0_self_attn_q_proj: sd-scripts' names, which ComfyUI
        maps). With network_args train_llm_adapter=True (lora_anima's), the LLM adapter's blocks too:
        lora_unet_llm_adapter_blocks_0_self_attn_q_proj .. _mlp_2 in kohya files (the original file's names), and
        text_conditioner.blocks.0... in peft files (diffusers' Anima pipeline's component). Qwen3 is not adapted."""
        return [AdapterTarget("denoiser", "lora_unet", linear_parents=BLOCK_PARENTS, diffusers_prefix="transformer",
                              kohya_layout=kohya_layout, llm_adapter_path=CONDITIONER.rstrip("."))]

    def swappable_blocks(self, parts: Components) -> list[torch.nn.Module]:
        return list(parts.denoiser.transformer_blocks)

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The DiT with its LLM adapter in the original layout (`net.`), what ComfyUI loads from diffusion_models/."""
        from library.memory import host_state_dict

        return transformer_to_file(host_state_dict(parts.denoiser))

    # ---- the training step ----------------------------------------------------------------

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """qwen_embeds: Qwen3's last hidden state (B, 512, 1024), padding zeroed; qwen_mask (B, 512); t5_ids and
        t5_mask (B, 512): the captions' T5 tokens (the adapter's queries). As sd-scripts' anima strategy encodes
        (max_length padding); clip_skip does not apply."""
        qwen, tokenizer = parts.text_encoders["te"], parts.tokenizers["te"]
        tokens = tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(qwen.device)
        hidden = qwen(input_ids=tokens.input_ids.to(qwen.device), attention_mask=mask).last_hidden_state
        t5 = parts.tokenizers["t5"](captions, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                                    return_tensors="pt")
        return {"qwen_embeds": hidden * mask[..., None].to(hidden.dtype), "qwen_mask": mask.to(hidden.device),
                "t5_ids": t5.input_ids.to(hidden.device), "t5_mask": t5.attention_mask.to(hidden.device)}

    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> (mode of the VAE's latents - latents_mean) / latents_std (B, 16, h, w),
        one frame of the 3D VAE, as sd-scripts' Anima and the Anima pipeline encode."""
        vae = parts.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean, std = _latent_stats(vae, latents)
        return (latents - mean) / std

    def decode_latents(self, parts: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = parts.vae
        mean, std = _latent_stats(vae, latents)
        return vae.decode((latents * std + mean).to(vae.device, vae.dtype).unsqueeze(2)).sample[:, :, 0]

    def objective(self, parts: Components):
        """sd-scripts' anima_train_network defaults: s = sigmoid(N(0, 1)) (timestep_sampling sigmoid, scale 1), the
        velocity noise - x_0 predicted as is; the [loss] keys override them."""
        from library.objectives import FlowMatchObjective

        return FlowMatchObjective(num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps,
                                  timestep_sampling="sigmoid", discrete_flow_shift=1.0, model_prediction_type="raw")

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        """The velocity (B, 16, h, w): the transformer called as sd-scripts' Anima training calls it (one latent
        frame, timestep s = t / 1000, a zero padding mask, the LLM adapter on Qwen3's states inside the forward)."""
        b, _, h, w = noisy_latents.shape
        device = noisy_latents.device
        text = {k: conditioning[k].to(device) for k in ("qwen_embeds", "qwen_mask", "t5_ids", "t5_mask")}
        out = parts.denoiser(noisy_latents.unsqueeze(2), timesteps.to(device, torch.float32) / 1000,
                             text["qwen_embeds"], text_mask=text["qwen_mask"], t5_ids=text["t5_ids"],
                             t5_mask=text["t5_mask"], padding_mask=noisy_latents.new_zeros(1, 1, h, w),
                             return_dict=False)[0]
        return out.squeeze(2)

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None, control_image: str | None = None):
        """The Anima pipeline's text-to-image loop over the conditioning training uses: latents drawn as it draws
        them, sigmas 1 .. 1/steps through the scheduler's shift, Euler steps, classifier-free guidance from the
        negative prompt unless guidance_scale is 1 (as its guider); the sampler name and `guidance` do not apply."""
        from diffusers.image_processor import VaeImageProcessor

        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn((1, 16, 1, height // 8, width // 8), generator=generator)[:, :, 0]
        with torch.no_grad():
            text = self.encode_prompts(parts, [prompt], clip_skip)
            negative = None if guidance_scale == 1 else self.encode_prompts(parts, [negative_prompt], clip_skip)
            latents = _denoise(self, parts, latents, steps, text, negative, guidance_scale)
            pixels = self.decode_latents(parts, latents)
        return VaeImageProcessor(vae_scale_factor=8).postprocess(pixels.float().cpu(), output_type="pil")[0]

    def pipeline(self, parts: Components, scheduler=None):
        """diffusers' AnimaModularPipeline over the parts themselves (no copy): the DiT as its transformer (diffusers'
        own class, sharing our modules: what a saved folder holds), the LLM adapter as its text_conditioner."""
        from diffusers import AnimaAutoBlocks

        pipe = AnimaAutoBlocks().init_pipeline()
        pipe.update_components(transformer=cosmos_view(parts.denoiser),
                               text_conditioner=parts.denoiser.text_conditioner,
                               text_encoder=parts.text_encoders["te"], tokenizer=parts.tokenizers["te"],
                               t5_tokenizer=parts.tokenizers["t5"], vae=parts.vae,
                               scheduler=scheduler or parts.noise_scheduler)
        return pipe


def _denoise(family, parts, latents, steps, text, negative, scale) -> torch.Tensor:
    """AnimaModularPipeline's loop: sigmas 1 .. 1/steps shifted by the scheduler, Euler steps on float32 latents;
    with `negative`, uncond + scale (cond - uncond), as its ClassifierFreeGuidance."""
    import copy

    import numpy as np

    scheduler = copy.deepcopy(parts.noise_scheduler)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    scheduler.set_begin_index(0)
    latents = latents.to(parts.denoiser.device)
    for t in scheduler.timesteps:
        timestep = t.expand(1).to(latents.device)
        pred = family.predict(parts, latents, timestep, text)
        if negative is not None:
            uncond = family.predict(parts, latents, timestep, negative)
            pred = uncond + scale * (pred - uncond)
        latents = scheduler.step(pred.float(), t, latents, return_dict=False)[0]
    return latents


def cosmos_view(denoiser: AnimaTransformer) -> CosmosTransformer3DModel:
    """The DiT as diffusers' CosmosTransformer3DModel, holding `denoiser`'s own submodules (no copy; an adapter put
    into one is in the other), without the LLM adapter."""
    with torch.device("meta"):
        view = CosmosTransformer3DModel.from_config(denoiser.config)
    for name, module in denoiser.named_children():
        if name != "text_conditioner":
            setattr(view, name, module)
    return view


def kohya_layout(module_path: str) -> tuple[str, int, int]:
    """AdapterTarget.kohya_layout: a layer by its original name (transformer_blocks.0.attn1.to_q ->
    blocks.0.self_attn.q_proj, unfused), as sd-scripts' lora_anima and ComfyUI name it."""
    return original_name(module_path), 0, 1


def empty_transformer(arch: Path, meta: bool = True, sizes: tuple[dict, dict] | None = None) -> AnimaTransformer:
    """The architecture's DiT with its LLM adapter (their configs updated with `sizes`, file_sizes' two dicts), on
    the meta device (weights assigned later) or, for a plan, on the current device."""
    import contextlib

    dit_sizes, adapter_sizes = sizes or ({}, {})
    with torch.device("meta") if meta else contextlib.nullcontext():
        denoiser = AnimaTransformer.from_config(
            {**CosmosTransformer3DModel.load_config(str(arch / "transformer")), **dit_sizes})
        denoiser.text_conditioner = AnimaTextConditioner.from_config(
            {**AnimaTextConditioner.load_config(str(arch / "text_conditioner")), **adapter_sizes})
    if meta:
        _rebuild_adapter_rotary(denoiser.text_conditioner)
    return denoiser


def file_sizes(dit: dict, adapter: dict) -> tuple[dict, dict]:
    """The DiT's and the adapter's sizes as their weights (diffusers' names) say, as sd-scripts reads an Anima file's
    configuration from its state dict (the 2B's 28 blocks of 2048, and other sizes alike)."""
    hidden, patch_in = dit["patch_embed.proj.weight"].shape
    blocks = "transformer_blocks.0."
    dit_sizes = {"in_channels": patch_in // 4 - 1, "out_channels": dit["proj_out.weight"].shape[0] // 4,
                 "attention_head_dim": dit[blocks + "attn1.norm_q.weight"].shape[0],
                 "num_layers": _count(dit, r"transformer_blocks\.(\d+)\."),
                 "adaln_lora_dim": dit[blocks + "norm1.linear_1.weight"].shape[0],
                 "text_embed_dim": dit[blocks + "attn2.to_k.weight"].shape[1],
                 "mlp_ratio": dit[blocks + "ff.net.0.proj.weight"].shape[0] / hidden}
    dit_sizes["num_attention_heads"] = hidden // dit_sizes["attention_head_dim"]
    vocab, target = adapter["embed.weight"].shape
    model_dim = adapter["blocks.0.cross_attn.q_proj.weight"].shape[0]
    adapter_sizes = {"target_vocab_size": vocab, "target_dim": target, "model_dim": model_dim,
                     "source_dim": adapter["blocks.0.cross_attn.k_proj.weight"].shape[1],
                     "num_attention_heads": model_dim // adapter["blocks.0.cross_attn.q_norm.weight"].shape[0],
                     "num_layers": _count(adapter, r"blocks\.(\d+)\."),
                     "mlp_ratio": adapter["blocks.0.mlp.0.weight"].shape[0] / model_dim}
    return dit_sizes, adapter_sizes


def _count(state: dict, pattern: str) -> int:
    import re

    return 1 + max(int(m.group(1)) for m in (re.match(pattern, k) for k in state) if m)


def _rebuild_adapter_rotary(conditioner: AnimaTextConditioner) -> None:
    """The adapter's RoPE inverse frequencies (a non-persistent buffer, left on the meta device), rebuilt as its
    own __init__ computes them."""
    rotary = conditioner.rotary_emb
    if rotary.inv_freq.is_meta:
        with torch.device("cpu"):
            fresh = type(rotary)(rotary.inv_freq.shape[0] * 2)
        rotary.register_buffer("inv_freq", fresh.inv_freq, persistent=False)


def _load_qwen3(path: str | Path, arch: Path) -> Qwen3Model:
    """Qwen3-0.6B: a transformers folder, or a single file (ComfyUI's qwen_3_06b_base.safetensors: causal-LM names)
    read with the architecture's text_encoder config."""
    if Path(path).is_dir():
        return Qwen3Model.from_pretrained(str(path))
    with torch.device("meta"):
        qwen = Qwen3Model(Qwen3Config.from_pretrained(str(arch / "text_encoder")))
    rebuild_qwen3_rotary(qwen)
    assign_weights(qwen, qwen3_keys(read_checkpoint(path)), path)
    return qwen


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1)
    return (torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype),
            torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype))


class _PlanningTokenizer:
    """Stands in for either tokenizer in a plan: TEXT_LENGTH ids, every one real."""

    def __call__(self, captions, **_):
        ids = torch.zeros((len(captions), TEXT_LENGTH), dtype=torch.long)
        return type("Tokens", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})()


def tokenizers(source: ModelSource, folder: str | None = None) -> dict:
    """Qwen3's tokenizer ("te") and the T5 tokenizer of the adapter's ids ("t5"), local files only. Qwen3's from
    model.tokenizer (its tokenizer/ or itself), the Anima folder, a Qwen3 text-encoder folder (as sd-scripts reads
    --qwen3), or the cache of circlestone-labs/Anima-Base-v1.0-Diffusers; T5's from model.t5_tokenizer, the
    t5_tokenizer/ of those folders, or the cache of google/t5-v1_1-xxl (sd-scripts' bundled vocabulary)."""
    qwen_places = [(source.tokenizer, "tokenizer"), (source.tokenizer, ""), (folder, "tokenizer"),
                   (_folder(source.text_encoder), ""), (DEFAULT_TOKENIZER, "tokenizer")]
    t5_places = [(source.t5_tokenizer, ""), (source.tokenizer, "t5_tokenizer"), (folder, "t5_tokenizer"),
                 (DEFAULT_TOKENIZER, "t5_tokenizer"), (T5_TOKENIZER, "")]
    found = {"te": _first_tokenizer(qwen_places, "Qwen3", "model.tokenizer"),
             "t5": _first_tokenizer(t5_places, "T5", "model.t5_tokenizer")}
    found["te"].padding_side = "right"
    return found


def _folder(path: str | None) -> str | None:
    return path if path and Path(path).is_dir() else None


def _first_tokenizer(places, what: str, key: str):
    from transformers import AutoTokenizer

    for where, subfolder in places:
        if not where:
            continue
        try:
            return AutoTokenizer.from_pretrained(where, subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError, TypeError):
            continue
    raise CheckpointError(f"Anima's {what} tokenizer not found locally; set {key} to a folder that holds it (an "
                          f"Anima diffusers folder has tokenizer/ and t5_tokenizer/), or run once with network access "
                          f"to fill the cache of {DEFAULT_TOKENIZER}", key=key)


register(AnimaFamily())
