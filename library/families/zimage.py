"""Z-Image (Tongyi-MAI's Z-Image-Turbo / Z-Image, 6.15B): a single-stream DiT (diffusers' ZImageTransformer2DModel:
2 noise-refiner and 2 context-refiner blocks, then 30 blocks over the joint sequence of image and caption tokens)
over 2x2 patches of 16-channel latents from FLUX.1's autoencoder, conditioned on the Qwen3-4B text encoder.

Text, as diffusers' ZImagePipeline encodes it: the caption as one user turn of Qwen3's chat template with the
assistant turn opened (QWEN3_PROMPT, what apply_chat_template gives with enable_thinking=True), padded to 512
tokens, run with the padding mask; the second-to-last hidden state, of the caption's real tokens only (the
transformer gets each caption's own length; encode_prompts keeps the padded batch and the mask, predict cuts).

The transformer takes t = 1 - s and predicts x_0 - noise; predict() hands back the velocity noise - x_0 (the
negated output, as the pipeline negates it before its Euler step). Flow matching with the model's own timestep
shift (its scheduler's shift 3.0, no resolution-dependent shift), raw velocity prediction.

Loads a diffusers folder (ZImagePipeline), or ComfyUI's split files: the transformer in its original layout
(`diffusion_models/z_image_turbo_bf16.safetensors`, library.zimage_layout) with model.text_encoder (Qwen3-4B,
`text_encoders/qwen_3_4b.safetensors`) and model.ae (`vae/ae.safetensors`, FLUX.1's), the architectures shipped in
library/arch/zimage, offline. The tokenizer comes from model.tokenizer (a folder with tokenizer/, or a Qwen3
tokenizer folder) or the local cache of Tongyi-MAI/Z-Image-Turbo.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from library.families.base import AdapterTarget, Components, ModelFamily, ModelSource, is_single_file, register
from library.families.transformer_parts import (assign_weights, encode_latents, load_ae, load_file_or_folder,
                                                missing_files_problem, qwen3_keys, rebuild_qwen3_rotary)
from library.loading import arch_dir, has_key_prefix, read_checkpoint, read_json
from library.objectives import FlowMatchObjective
from library.zimage_layout import PREFIX, kohya_layout, original_to_transformer, transformer_to_original

PIPELINE_CLASS = "ZImagePipeline"
DEFAULT_TOKENIZER = "Tongyi-MAI/Z-Image-Turbo"
BLOCK_PARENTS = ("ZImageTransformerBlock",)
SEPARATE_FILES = ("text_encoder", "ae")
QWEN3_PROMPT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
TEXT_LENGTH = 512  # ZImagePipeline's max_sequence_length
HIDDEN_LAYER = -2  # the second-to-last hidden state


class ZImageFamily(ModelFamily):
    name = "zimage"
    block_classes = ("ZImageTransformerBlock",)  # FSDP2 shards each as a unit
    xformers_attention = False  # its own attention processors run on PyTorch SDPA
    text_encoder_folders = {"text_encoder": "te"}  # diffusers subfolder -> our name
    cached_apart = None  # one text encoder, never trained: its outputs are cached whole or not at all
    adapter_base_versions = ("zimage",)
    folder_parts = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def file_metadata(self, parts: Components) -> dict[str, str]:
        return {"ss_base_model_version": "zimage", "ss_v2": "False", "ss_v_parameterization": "False",
                "modelspec.architecture": "z-image"}

    # ---- recognising and loading ----------------------------------------------------------

    def claims(self, path: str) -> bool:
        if is_single_file(path):
            return any(has_key_prefix(path, prefix + "context_refiner.") for prefix in ("", PREFIX))
        index = Path(path) / "model_index.json"
        return index.is_file() and read_json(index).get("_class_name") == PIPELINE_CLASS

    def recognises(self, tensors) -> bool:
        return any(k.removeprefix(PREFIX).startswith("context_refiner.") for k in tensors)

    def single_file_problem(self, tensors, source: ModelSource) -> str | None:
        return missing_files_problem(source, SEPARATE_FILES, "a Z-Image transformer file", _separate_file)

    def load(self, source: ModelSource) -> Components:
        return load_file_or_folder(source, self._load_single_file, self._load_folder, self.single_file_problem)

    def _load_folder(self, source: ModelSource) -> Components:
        path = source.path
        vae = load_ae(source.ae, arch_dir("zimage")) if source.ae else AutoencoderKL.from_pretrained(
            path, subfolder="vae")
        return Components(
            denoiser=ZImageTransformer2DModel.from_pretrained(path, subfolder="transformer"), vae=vae,
            text_encoders={"te": Qwen3Model.from_pretrained(path, subfolder="text_encoder")},
            tokenizers={"te": _tokenizer(source.tokenizer or path)},
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"))

    def _load_single_file(self, source: ModelSource) -> Components:
        arch = arch_dir(source.arch or "zimage")
        with torch.device("meta"):
            denoiser = ZImageTransformer2DModel.from_config(
                ZImageTransformer2DModel.load_config(str(arch / "transformer")))
            qwen = Qwen3Model(Qwen3Config.from_pretrained(str(arch / "text_encoder")))
        rebuild_qwen3_rotary(qwen)
        assign_weights(denoiser, original_to_transformer(read_checkpoint(source.path)), source.path)
        assign_weights(qwen, qwen3_keys(read_checkpoint(source.text_encoder)), source.text_encoder)
        return Components(denoiser=denoiser, vae=load_ae(_separate_file(source, "ae"), arch),
                          text_encoders={"te": qwen},
                          tokenizers={"te": _tokenizer(source.tokenizer or DEFAULT_TOKENIZER)},
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(arch),
                                                                                          subfolder="scheduler"),
                          extra={"arch": str(arch)})

    # ---- what adapters train --------------------------------------------------------------

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        """The Linears of every transformer block (attention q/k/v/out, the SwiGLU feed-forward, the adaLN
        modulation), named in kohya files as the original checkpoint names them (lora_unet_layers_0_attention_qkv,
        the q/k/v adapters fused: what ComfyUI maps); Qwen3 is not trained."""
        return [AdapterTarget("denoiser", "lora_unet", linear_parents=BLOCK_PARENTS, diffusers_prefix="transformer",
                              kohya_layout=kohya_layout)]

    def swappable_blocks(self, parts: Components) -> list[torch.nn.Module]:
        """The blocks train.blocks_to_swap may keep in CPU memory, in execution order: the noise and context
        refiners, then the main layers."""
        model = parts.denoiser
        return [*model.noise_refiner, *model.context_refiner, *model.layers]

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The transformer in the original layout (what ComfyUI loads from diffusion_models/)."""
        from library.memory import host_state_dict

        return transformer_to_original(host_state_dict(parts.denoiser))

    # ---- the training step ----------------------------------------------------------------

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """prompt_embeds: Qwen3's second-to-last hidden state (B, 512, width) of the captions in the chat template,
        run with the padding mask; text_mask: the real tokens (B, 512), on the host (predict() reads the lengths).
        clip_skip does not apply."""
        qwen, tokenizer = parts.text_encoders["te"], parts.tokenizers["te"]
        tokens = tokenizer([QWEN3_PROMPT.format(c) for c in captions], padding="max_length", max_length=TEXT_LENGTH,
                           truncation=True, return_tensors="pt")
        hidden = qwen(input_ids=tokens.input_ids.to(qwen.device), attention_mask=tokens.attention_mask.to(qwen.device),
                      output_hidden_states=True).hidden_states[HIDDEN_LAYER]
        return {"prompt_embeds": hidden, "text_mask": tokens.attention_mask.bool()}  # the mask stays on the host

    def encode_images(self, parts: Components, pixels: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        return encode_latents(parts, pixels, generator)

    def objective(self, parts: Components) -> FlowMatchObjective:
        """Shifted timesteps with the shift of the model's own scheduler (3.0), the velocity predicted as is."""
        config = parts.noise_scheduler.config
        return FlowMatchObjective(num_train_timesteps=config.num_train_timesteps, timestep_sampling="shift",
                                  discrete_flow_shift=float(config.shift), model_prediction_type="raw")

    def predict(self, parts: Components, noisy_latents, timesteps, conditioning):
        """The velocity noise - x_0 (B, 16, h, w): the transformer called as ZImagePipeline calls it (a list of
        (16, 1, h, w) latents, t = 1 - s, each caption's real tokens), its output negated."""
        device = noisy_latents.device
        embeds = conditioning["prompt_embeds"].to(device)
        # the mask is on the host (cached outputs: on the device, one read); a plan's fake one reads all True
        lengths = [sum(row) for row in conditioning["text_mask"].tolist()]
        captions = [embeds[i, :n] for i, n in enumerate(lengths)]
        t = 1 - timesteps.to(device, torch.float32) / 1000
        out = parts.denoiser(list(noisy_latents.unsqueeze(2).unbind(0)), t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    # ---- preview images -------------------------------------------------------------------

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None):
        """ZImagePipeline's flow-matching Euler steps over the conditioning training uses, with classifier-free
        guidance from the negative prompt where guidance_scale > 0 (Z-Image-Turbo samples with 0 and ~8 steps:
        set --l 0 in the prompt line). `guidance` and the sampler name do not apply."""
        pipe = self.pipeline(parts)
        pipe.set_progress_bar_config(disable=True)
        positive, negative = (self.caption_embeds(parts, text) for text in (prompt, negative_prompt))
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt_embeds=positive, negative_prompt_embeds=negative, width=width, height=height,
                    num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images[0]

    def caption_embeds(self, parts: Components, caption: str) -> list[torch.Tensor]:
        """One caption as ZImagePipeline takes it: a list of its real tokens' states (n, width)."""
        with torch.no_grad():
            text = self.encode_prompts(parts, [caption], 1)
        return [text["prompt_embeds"][0, : int(text["text_mask"][0].sum())]]

    def pipeline(self, parts: Components, scheduler=None):
        """A diffusers ZImagePipeline over the parts themselves (no copy)."""
        from diffusers import ZImagePipeline

        return ZImagePipeline(scheduler=scheduler or parts.noise_scheduler, vae=parts.vae,
                              text_encoder=parts.text_encoders["te"], tokenizer=parts.tokenizers["te"],
                              transformer=parts.denoiser)


def _separate_file(source: ModelSource, key: str) -> str | None:
    """model.text_encoder; model.ae, or model.vae naming the same autoencoder file."""
    return source.text_encoder if key == "text_encoder" else (source.ae or source.vae)


def _tokenizer(where: str):
    """Qwen3's tokenizer from `where`'s tokenizer/ subfolder, or `where` itself; right padding (Qwen3's own),
    which predict() relies on to cut each caption's real tokens."""
    from library.loading import load_tokenizer

    tokenizer = load_tokenizer(where, ("tokenizer", ""), (DEFAULT_TOKENIZER, "tokenizer"), "Z-Image Qwen3")
    tokenizer.padding_side = "right"
    return tokenizer


register(ZImageFamily())
