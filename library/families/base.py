"""The ModelFamily interface and the registry of families.

Everything that differs between SD1, SDXL, SD3 and FLUX lives behind this interface, one module per
family. A recipe asks the family to load the parts, encode prompts and images, make the training
target, call the denoiser and render a sample; it never branches on the family's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn

from library.loading import TensorInfo


@dataclass
class ModelSource:
    """Where the weights come from, with the few settings loading needs (never the whole config)."""
    path: str
    v2: bool = False
    v_parameterization: bool = False
    tokenizer: str | None = None
    arch: str | None = None
    vae: str | None = None
    # separate files beside a single-file denoiser (FLUX.1 / SD3, sd-scripts' names)
    clip_l: str | None = None
    clip_g: str | None = None
    t5xxl: str | None = None
    ae: str | None = None
    text_encoder: str | None = None  # Qwen-Image: the Qwen2.5-VL file beside a single-file transformer
    max_token_length: int | None = None  # SD1 / SDXL: 150 / 225 encode captions in 75-token windows
    t5xxl_max_token_length: int | None = None  # None: the family's default
    apply_t5_attn_mask: bool = False
    t5xxl_precision: str = "auto"  # library.quantization: how a frozen T5 is stored while encoding
    guidance_scale: float = 3.5  # FLUX.1-dev's guidance input in training

    @classmethod
    def from_section(cls, model_section) -> "ModelSource":
        """The [model] section's loading keys (every field of this class the section has)."""
        from dataclasses import fields

        return cls(**{f.name: getattr(model_section, f.name) for f in fields(cls)
                      if f.name != "path" and hasattr(model_section, f.name)},
                   path=model_section.pretrained_model_name_or_path)


@dataclass
class Components:
    """The loaded parts of a latent-diffusion model, named the same way for every family."""
    denoiser: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]  # kohya name of the encoder ("te", "te1", ...) -> module
    tokenizers: dict[str, Any]
    noise_scheduler: Any
    source: ModelSource | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterTarget:
    """Which layers of one component adapters go into, and the kohya prefix of its keys.

    Layers inside modules whose class name is in `linear_parents` get adapters on their Linear and
    1x1 Conv2d children (rank network_dim); with LoCon, the 3x3 Conv2d (and Linear) children of
    `conv_parents` get them too (rank conv_dim).
    """
    component: str  # "denoiser" or a text-encoder name
    kohya_prefix: str  # "lora_unet", "lora_te", ...
    linear_parents: tuple[str, ...]
    conv_parents: tuple[str, ...] = ()
    kohya_path_prefix: str = ""  # added to module paths in file keys (transformers 5 dropped "text_model.")
    # kohya's block-wise index of a layer (block_dims, down/mid/up_lr_weight), None where there is none
    block_index: Callable[[str], int | None] | None = None
    diffusers_prefix: str = ""  # key prefix in peft / diffusers layout files ("unet", "text_encoder")
    # a layer's module path as other kohya files of this family name it (SDXL U-Net: the SAI names sd-scripts
    # writes, input_blocks.4.1...), for loading those files; None: only the module path itself
    kohya_names: Callable[[str], str] | None = None
    # the names sd-scripts / ComfyUI give this component's layers where its checkpoints fuse several module
    # paths into one weight (FLUX double_blocks.0.img_attn.qkv = attn.to_q, to_k, to_v along the output rows;
    # SD3 joint_blocks.0.x_block.attn.qkv): module path -> (layer name in files, dots kept, without the kohya
    # prefix; the path's position among the fused parts; the number of parts, 1 for a renamed unfused layer),
    # None for a layer without such a name (it keeps its module-path name). Parts are concatenated along the
    # output dimension in position order. Kohya files use these names (networks/lycoris_format.py); files
    # named by module path still load.
    kohya_layout: Callable[[str], tuple[str, int, int] | None] | None = None


class ModelFamily(Protocol):
    name: str

    def claims(self, path: str) -> bool:
        """True if the checkpoint at `path` belongs to this family."""

    # ss_base_model_version values of adapter files made for this family's models (checked before loading)
    adapter_base_versions: tuple[str, ...]
    # the subfolders of a diffusers folder that load() reads (checked before loading)
    folder_parts: tuple[str, ...]

    def recognises(self, tensors: dict[str, TensorInfo]) -> bool:
        """True if a single file with these tensors (names and shapes from its header) is this family's."""

    def single_file_problem(self, tensors: dict[str, TensorInfo], source: ModelSource) -> str | None:
        """Why load(source) would fail on a single file of this family with these tensors (shapes no shipped
        architecture has, parts neither in the file nor named by a key), from its header alone; None if none."""

    def load(self, source: ModelSource) -> Components: ...

    def file_metadata(self, parts: Components) -> dict[str, str]:
        """ss_base_model_version, modelspec.architecture (without "/lora") and the like."""

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]: ...

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """Text conditioning of a batch of captions, as a dict of batched tensors. Families with a
        cached_apart encoder also take its encode_apart output (t5=...) instead of running it."""

    cached_apart: str | None
    """The text encoder whose outputs can be cached while the others train (FLUX.1 / SD3: "te3", T5), with
    encode_apart(parts, captions) -> its share of encode_prompts; None where the family has none."""

    def conditioning_for_batch(self, parts: Components, batch: dict, conditioning: dict[str, torch.Tensor],
                               latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """encode_prompts' (or the cache's) text conditioning plus what the family takes from the batch
        itself (SDXL: each example's original_size / crop_top_left / target_size); `latents` give the
        trained size where the batch has none. What predict() receives."""

    def encode_images(self, parts: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents."""

    def objective(self, parts: Components):
        """The noising and target rule the denoiser is trained with (library.objectives)."""

    def predict(self, parts: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None):
        """One image (PIL) from the model as it is; `guidance` is the distilled-guidance input (FLUX)."""

    # Optional: families whose denoiser is a stack of transformer blocks (SD3, FLUX) also define
    #   swappable_blocks(parts) -> list[nn.Module]: the blocks in the order they run (blocks_to_swap).
    # Families whose latents are not decoded by parts.vae.decode(latents) alone (Qwen-Image's 3D VAE,
    # normalized latents) define decode_latents(parts, latents) -> images in [-1, 1] (B, 3, H, W).


_REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    _REGISTRY[family.name] = family
    return family


def registered() -> list[ModelFamily]:
    """Every family, in the order family = "auto" asks them."""
    from library import families  # noqa: F401  (imports every family module, which registers it)

    return list(_REGISTRY.values())


def get_family(name: str, path: str) -> ModelFamily:
    """The family called `name`, or, for "auto", the first family that claims the checkpoint."""
    from library import families  # noqa: F401  (imports every family module, which registers it)

    if name != "auto":
        return _REGISTRY[name]
    for family in _REGISTRY.values():
        if family.claims(path):
            return family
    raise ValueError(f"{path}: no model family recognises this checkpoint; set model.family")


def is_single_file(path: str) -> bool:
    return Path(path).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
