"""Qwen-Image (20B) and Qwen-Image-Edit (2509 / 2511): a QwenImageTransformer2DModel (60 dual-stream blocks) over
2x2-packed 16-channel latents of the Qwen-Image VAE (Wan-2.1-type, normalized by per-channel means and
deviations), conditioned on the last hidden state of Qwen2.5-VL-7B's language model, trained with flow matching
with Qwen-Image's resolution-dependent shift (timestep_sampling = "qwen_shift", as musubi-tuner names it).

Text: the caption in Qwen-Image's chat template, run through the language model of Qwen2.5-VL (the text path of
the VL encoder: only the language model is loaded, not the vision tower nor lm_head, 1.2B parameters fewer), the
template's system prefix dropped (the tokens before the caption), padding masked out of the joint attention; as
QwenImagePipeline encodes prompts. Edit models use the Edit template. For Edit pair training the conditioning is
text-only plus the reference latents: the Edit pipelines also show the reference image to the VL encoder (a
384x384 view through the vision tower); training here does not, so text outputs stay cacheable per caption and
the vision tower never loads. The reference image reaches the transformer as packed latents appended to the image
tokens, with their own RoPE frame (img_shapes), as QwenImageEditPlusPipeline builds them; Edit-2511 modulates
them at timestep zero (zero_cond_t).

Loads a diffusers folder (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline), or the split files
ComfyUI users have: the transformer file (diffusers' names, with or without `model.diffusion_model.`) with
model.text_encoder (qwen_2.5_vl_7b.safetensors) and model.vae (qwen_image_vae.safetensors, the Wan-2.1 layout,
or a diffusers-layout VAE), the architectures shipped in library/arch/qwen-image, qwen-image-edit and
qwen-image-edit-2511 (ComfyUI's `__index_timestep_zero__` marker picks 2511; model.arch overrides), offline.
The tokenizer comes from model.tokenizer (a folder with tokenizer/, or a tokenizer folder) or the local cache of
Qwen/Qwen-Image.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

from library.families.base import AdapterTarget, Components, ModelFamily, ModelSource, is_single_file, register
from library.families.transformer_parts import (assign_weights, load_file_or_folder, load_qwen_image_vae,
                                                missing_files_problem, pack_latents, unpack_latents)
from library.loading import CheckpointError, arch_dir, has_key_prefix, read_checkpoint, read_json
from library.objectives import FlowMatchObjective
from library.qwen_image_layout import (TRANSFORMER_MARK, TRANSFORMER_PREFIXES, file_to_transformer,
                                       is_transformer_key, text_model_keys)

PIPELINES = {"QwenImagePipeline": False, "QwenImageEditPipeline": True, "QwenImageEditPlusPipeline": True}
DEFAULT_TOKENIZER = "Qwen/Qwen-Image"
BLOCK_PARENTS = ("QwenImageTransformerBlock",)
SEPARATE_FILES = ("text_encoder", "vae")
EDIT_2511_MARK = "__index_timestep_zero__"  # ComfyUI's marker of Edit-2511's zero-timestep reference modulation
# QwenImagePipeline / QwenImageEditPlusPipeline: the chat templates; the tokens before "{}" are dropped
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
EDIT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                 "objects, background), then explain how the user's text instruction should alter or modify the "
                 "image. Generate a new image that meets the user's requirements while maintaining consistency "
                 "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")
TOKENIZER_MAX_LENGTH = 1024  # the pipelines' tokenizer limit (after the dropped prefix)
MAX_SEQUENCE_LENGTH = 512  # the text tokens the transformer gets (QwenImagePipeline's default)


class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    block_classes = ("QwenImageTransformerBlock",)  # FSDP2 shards each as a unit
    xformers_attention = False  # joint attention runs on PyTorch SDPA
    takes_control_images = True  # Qwen-Image-Edit pairs (control_directory): reference tokens
    cached_apart = None  # one text encoder, never trained: its outputs are cached whole or not at all
    adapter_base_versions = ("qwen_image", "qwen_image_edit")
    folder_parts = ("transformer", "vae", "text_encoder", "scheduler")

    def file_metadata(self, parts: Components) -> dict[str, str]:
        edit = is_edit(parts)
        return {"ss_base_model_version": "qwen_image_edit" if edit else "qwen_image", "ss_v2": "False",
                "ss_v_parameterization": "False",
                "modelspec.architecture": "qwen-image-edit" if edit else "qwen-image"}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):
            return any(has_key_prefix(path, p + TRANSFORMER_MARK) for p in ("", *TRANSFORMER_PREFIXES))
        index = Path(path) / "model_index.json"
        return index.is_file() and read_json(index).get("_class_name") in PIPELINES

    def recognises(self, tensors) -> bool:
        return any(is_transformer_key(k) for k in tensors)

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        return missing_files_problem(source, SEPARATE_FILES, "a Qwen-Image transformer file")

    def load(self, source: ModelSource) -> Components:
        return load_file_or_folder(source, self._load_single_file, self._load_folder, self.single_file_problem)

    def _load_folder(self, source: ModelSource) -> Components:
        path = Path(source.path)
        vae = load_qwen_image_vae(source.vae, path, arch_dir("qwen-image"))
        text = _load_text_model(source.text_encoder, arch_dir("qwen-image")) if source.text_encoder else \
            _load_text_model(path / "text_encoder", path)
        return Components(
            denoiser=QwenImageTransformer2DModel.from_pretrained(str(path), subfolder="transformer"), vae=vae,
            text_encoders={"te": text}, tokenizers={"te": _tokenizer(source.tokenizer or str(path))},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(path), subfolder="scheduler"),
            extra={"edit": _edit_pipeline(path)})

    def _load_single_file(self, source: ModelSource) -> Components:
        state = file_to_transformer(read_checkpoint(source.path))
        marked = state.pop(EDIT_2511_MARK, None) is not None
        arch = arch_dir(source.arch or ("qwen-image-edit-2511" if marked else "qwen-image"))
        denoiser = _empty_transformer(arch)
        assign_weights(denoiser, state, source.path)
        return Components(denoiser=denoiser, vae=load_qwen_image_vae(source.vae, None, arch),
                          text_encoders={"te": _load_text_model(source.text_encoder, arch)},
                          tokenizers={"te": _tokenizer(source.tokenizer or DEFAULT_TOKENIZER)},
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"),
                          extra={"arch": str(arch), "edit": _edit_pipeline(arch)})

    def planning_parts(self, arch: Path) -> Components:
        """The architecture's parts with random weights on the current (the planner's fake) device: the language
        model only (as load() reads it), captions planned at the most tokens the transformer gets."""
        from transformers import AutoConfig, Qwen2_5_VLTextModel

        return Components(
            denoiser=QwenImageTransformer2DModel.from_config(QwenImageTransformer2DModel.load_config(
                str(arch / "transformer"))),
            vae=AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(str(arch / "vae"))),
            text_encoders={"te": Qwen2_5_VLTextModel(
                AutoConfig.from_pretrained(str(arch / "text_encoder")).text_config)},
            tokenizers={"te": _PlanningTokenizer()}, source=ModelSource(str(arch)),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch), subfolder="scheduler"),
            extra={"arch": str(arch), "edit": _edit_pipeline(arch)})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        """Every Linear of the dual-stream blocks (attention, MLPs, modulation), named in files by module path
        (lora_unet_transformer_blocks_0_attn_to_q: ComfyUI maps diffusion_model's names so, diffusers'
        Qwen LoRA converter reads them back); the text encoder is not trained (as in musubi-tuner)."""
        return [AdapterTarget("denoiser", "lora_unet", linear_parents=BLOCK_PARENTS, diffusers_prefix="transformer")]

    def swappable_blocks(self, parts: Components) -> list[torch.nn.Module]:
        """The blocks train.blocks_to_swap may keep in CPU memory, in execution order."""
        return list(parts.denoiser.transformer_blocks)

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The transformer as ComfyUI's diffusion_models file holds it (diffusers' names); Edit-2511 with
        ComfyUI's marker."""
        from library.memory import host_state_dict

        state = host_state_dict(parts.denoiser)
        if parts.denoiser.config.zero_cond_t:
            state[EDIT_2511_MARK] = torch.tensor([])
        return state

    # ---- the training step ----------------------------------------------------------------

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """prompt_embeds: the language model's last hidden state of each caption in the chat template, the system
        prefix dropped, padded (right, with zeros) to the batch's longest (B, L, 3584); prompt_embeds_mask: its
        real tokens (B, L). As QwenImagePipeline encodes prompts. clip_skip does not apply."""
        model, tokenizer = parts.text_encoders["te"], parts.tokenizers["te"]
        template = EDIT_TEMPLATE if is_edit(parts) else TEMPLATE
        drop = prefix_length(tokenizer, template)
        tokens = tokenizer([template.format(c) for c in captions], max_length=TOKENIZER_MAX_LENGTH + drop,
                           padding=True, truncation=True, padding_side="right", return_tensors="pt")
        mask = tokens.attention_mask.to(model.device)
        hidden = model(input_ids=tokens.input_ids.to(model.device), attention_mask=mask).last_hidden_state
        keep = slice(drop, drop + MAX_SEQUENCE_LENGTH)  # every caption starts after the same prefix
        mask = mask[:, keep].to(hidden.device, torch.bool)
        return {"prompt_embeds": hidden[:, keep] * mask[..., None].to(hidden.dtype), "prompt_embeds_mask": mask}

    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> (mode of the VAE's latents - latents_mean) / latents_std (B, 16, h, w),
        one frame of the 3D VAE, as the Qwen-Image pipelines encode images."""
        vae = parts.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mode()[:, :, 0]
        mean, std = _latent_stats(vae, latents)
        return (latents - mean) / std

    def decode_latents(self, parts: Components, latents: torch.Tensor) -> torch.Tensor:
        """encode_images' latents (B, 16, h, w) -> images in [-1, 1] (B, 3, H, W): denormalized, one frame of the
        3D VAE, as the Qwen-Image pipelines decode."""
        vae = parts.vae
        mean, std = _latent_stats(vae, latents)
        return vae.decode((latents * std + mean).to(vae.device, vae.dtype).unsqueeze(2)).sample[:, :, 0]

    def objective(self, parts: Components) -> FlowMatchObjective:
        """The velocity (noise - x_0) predicted as is (raw, as musubi-tuner trains Qwen-Image), timesteps drawn
        with Qwen-Image's resolution-dependent shift; the [loss] keys override both."""
        return FlowMatchObjective(num_train_timesteps=parts.noise_scheduler.config.num_train_timesteps,
                                  timestep_sampling="qwen_shift", model_prediction_type="raw")

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        """The transformer called as QwenImagePipeline calls it (packed latents, img_shapes for RoPE, timestep
        t / 1000, the text mask; text padding past the batch's longest caption trimmed, no mask when none is
        left); with control latents, the reference tokens after the image's, as QwenImageEditPlusPipeline."""
        b, _, h, w = noisy_latents.shape
        device = noisy_latents.device
        text, mask = _trimmed_text(conditioning, device)
        tokens, shapes = pack_latents(noisy_latents), [(1, h // 2, w // 2)]
        n = tokens.shape[1]
        if "control_latents" in conditioning:
            reference = conditioning["control_latents"].to(device, tokens.dtype)
            tokens = torch.cat([tokens, pack_latents(reference)], dim=1)
            shapes.append((1, reference.shape[2] // 2, reference.shape[3] // 2))
        out = parts.denoiser(hidden_states=tokens, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                             timestep=timesteps.to(device, torch.float32) / 1000, img_shapes=[shapes] * b).sample
        return unpack_latents(out[:, :n], h, w)

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None, control_image: str | None = None):
        """QwenImagePipeline's sampling over the conditioning training uses: flow-matching Euler steps with its
        dynamic shift, true CFG (guidance_scale, with the pipeline's norm rescale) when guidance_scale > 1; the
        sampler name and `guidance` do not apply. With a control image (--ci, Edit models), the image at the
        sample's size is the reference, as in training."""
        from diffusers.image_processor import VaeImageProcessor

        h, w = height // 16 * 2, width // 16 * 2
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn((1, 1, 16, h, w), generator=generator)[:, 0]  # QwenImagePipeline's draw
        with torch.no_grad():
            text = self.encode_prompts(parts, [prompt], clip_skip)
            negative = self.encode_prompts(parts, [negative_prompt], clip_skip) if guidance_scale > 1 else None
            if control_image is not None:
                reference = _reference_pixels(control_image, w * 8, h * 8)
                text["control_latents"] = self.encode_images(parts, reference)
                if negative is not None:
                    negative["control_latents"] = text["control_latents"]
            latents = _denoise(self, parts, latents, steps, text, negative, guidance_scale)
            pixels = self.decode_latents(parts, latents)
        return VaeImageProcessor(vae_scale_factor=16).postprocess(pixels.float().cpu(), output_type="pil")[0]

    def pipeline(self, parts: Components, scheduler=None):
        """A diffusers QwenImagePipeline over the parts themselves (no copy); its text_encoder is the language model
        (what QwenImagePipeline's text-only encoding calls)."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(scheduler=scheduler or parts.noise_scheduler, vae=parts.vae,
                                 text_encoder=parts.text_encoders["te"], tokenizer=parts.tokenizers["te"],
                                 transformer=parts.denoiser)


def _denoise(family, parts, latents, steps, text, negative, scale) -> torch.Tensor:
    """QwenImagePipeline's loop: sigmas 1 .. 1/steps shifted by mu of the packed length, Euler steps; with
    `negative`, true CFG rescaled to the conditional prediction's norm per packed token."""
    import copy

    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = copy.deepcopy(parts.noise_scheduler)
    c = scheduler.config
    mu = calculate_shift(latents.shape[2] * latents.shape[3] // 4, c.get("base_image_seq_len", 256),
                         c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler.set_begin_index(0)
    device = parts.denoiser.device
    latents = latents.to(device)
    for t in scheduler.timesteps:
        timestep = t.expand(1).to(device)
        pred = family.predict(parts, latents, timestep, text)
        if negative is not None:
            cond, uncond = pack_latents(pred), pack_latents(family.predict(parts, latents, timestep, negative))
            combined = uncond + scale * (cond - uncond)
            combined = combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
            pred = unpack_latents(combined, latents.shape[2], latents.shape[3])
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def _reference_pixels(path: str, width: int, height: int) -> torch.Tensor:
    """The control image of a sample, upright and RGB, resized to the sample's size, in [-1, 1] (1, 3, H, W)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        image = ImageOps.exif_transpose(im).convert("RGB").resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def is_edit(parts: Components) -> bool:
    """An Edit model (its pipeline or shipped architecture says so; Edit-2511's transformer always is)."""
    return bool(parts.extra.get("edit")) or bool(parts.denoiser.config.zero_cond_t)


def _edit_pipeline(folder: Path) -> bool:
    """The folder's (or shipped architecture's) model_index.json names an Edit pipeline."""
    index = folder / "model_index.json"
    return index.is_file() and PIPELINES.get(read_json(index).get("_class_name"), False)


def prefix_length(tokenizer, template: str) -> int:
    """The tokens of the template before the caption: what the pipelines drop (34 for Qwen-Image's template with
    Qwen2.5-VL's tokenizer, 64 for the Edit template)."""
    return len(tokenizer(template.split("{}")[0]).input_ids)


def _trimmed_text(conditioning: dict, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """prompt_embeds and its (right-padded) mask, cut to the batch's longest caption; the mask None when every
    token is real (the transformer then attends without one, as QwenImagePipeline with a mask of ones)."""
    text = conditioning["prompt_embeds"].to(device)
    mask = conditioning["prompt_embeds_mask"].to(device, torch.bool)
    if bool(mask[:, -1].all()):  # every caption reaches the end: no padding
        return text, None
    longest = int(mask.sum(dim=1).max())
    text, mask = text[:, :longest], mask[:, :longest]
    return text, None if bool(mask.all()) else mask


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1)
    return (torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype),
            torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype))


def _empty_transformer(arch: Path) -> QwenImageTransformer2DModel:
    """The architecture's transformer on the meta device, with its RoPE tables (plain tensors, not buffers)
    computed on the host."""
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedLayer3DRope, QwenEmbedRope

    config = QwenImageTransformer2DModel.load_config(str(arch / "transformer"))
    with torch.device("meta"):
        denoiser = QwenImageTransformer2DModel.from_config(config)
    rope = QwenEmbedLayer3DRope if denoiser.config.use_layer3d_rope else QwenEmbedRope
    denoiser.pos_embed = rope(theta=10000, axes_dim=list(denoiser.config.axes_dims_rope), scale_rope=True)
    return denoiser


def _load_text_model(path: str | Path, arch: Path):
    """Qwen2.5-VL's language model (Qwen2_5_VLTextModel) from a text_encoder folder (config.json and its
    .safetensors files) or a single file read with the architecture's text_encoder config; the vision tower and
    lm_head are not loaded."""
    from transformers import AutoConfig, Qwen2_5_VLTextModel
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    path = Path(path)
    folder = path if path.is_dir() else arch / "text_encoder"
    config = AutoConfig.from_pretrained(str(folder if (folder / "config.json").is_file() else arch / "text_encoder"))
    config = getattr(config, "text_config", config)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"{path}: no .safetensors weights of the text encoder")
    state = {}
    for file in files:
        state.update(text_model_keys(read_checkpoint(file)))
    with torch.device("meta"):
        model = Qwen2_5_VLTextModel(config)
    model.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=config)  # its inverse frequencies: computed, not stored
    assign_weights(model, state, path)
    return model.eval()


class _PlanningTokenizer:
    """Stands in for Qwen2.5-VL's tokenizer in a plan (none ships with the architectures): the template's prefix
    as Qwen2.5-VL's tokenizer splits it (34 tokens), then a caption of MAX_SEQUENCE_LENGTH tokens, no padding."""
    PREFIX = 34

    def __call__(self, text, **_):
        if isinstance(text, str):
            return type("Tokens", (), {"input_ids": [0] * self.PREFIX})()
        ids = torch.zeros((len(text), self.PREFIX + MAX_SEQUENCE_LENGTH), dtype=torch.long)
        return type("Tokens", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})()


def _tokenizer(where: str):
    """Qwen2.5-VL's tokenizer from `where`'s tokenizer/ (or `where` itself), the cache, or fetched once from
    Qwen-Image's repo (library.loading.load_tokenizer)."""
    from library.loading import load_tokenizer

    return load_tokenizer(where, ("tokenizer", ""), (DEFAULT_TOKENIZER, "tokenizer"), "Qwen-Image Qwen2.5-VL")


register(QwenImageFamily())
