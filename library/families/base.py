"""The ModelFamily interface and the registry of families.

Everything that differs between SD1, SDXL, SD3 and FLUX lives behind this interface, one module per
family. A recipe asks the family to load the parts, encode prompts and images, make the training
target, call the denoiser and render a sample; it never branches on the family's name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    text_encoder: str | None = None  # FLUX.2 / Qwen-Image / Z-Image: the text encoder's own file
    max_token_length: int | None = None  # SD1 / SDXL: 150 / 225 encode captions in 75-token windows
    weighted_captions: bool = False  # SD1 / SDXL: "(word:1.2)" weights each token's text state
    t5xxl_max_token_length: int | None = None  # None: the family's default
    apply_t5_attn_mask: bool = False
    t5xxl_precision: str = "auto"  # library.quantization: how a frozen T5 is stored while encoding
    guidance_scale: float = 3.5  # FLUX.1-dev's guidance input in training
    t5_tokenizer: str | None = None  # Anima: the T5 tokenizer of the LLM adapter's ids
    llm_adapter: str | None = None  # Anima: a separate LLM adapter file

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
    # the module path of an LLM adapter inside this component (Anima's text_conditioner): its layers among
    # linear_parents get adapters only with network_args train_llm_adapter=True (sd-scripts' lora_anima), and
    # peft / diffusers files key them under that path alone (diffusers loads it as a pipeline component)
    llm_adapter_path: str = ""


class ModelFamily:
    """The complete interface of a family: every method and attribute the rest of the code uses on one. Each
    family module subclasses it; what every family must say raises NotImplementedError here, optional
    capabilities have their default here (never a `hasattr` probe elsewhere)."""
    name: str
    # ss_base_model_version values of adapter files made for this family's models (checked before loading)
    adapter_base_versions: tuple[str, ...] = ()
    # the subfolders of a diffusers folder that load() reads (checked before loading)
    folder_parts: tuple[str, ...] = ()
    # the diffusers subfolder of each text encoder -> its name in Components.text_encoders ("te", "te1", ...)
    text_encoder_folders: dict[str, str] = {}
    cached_apart: str | None = None
    """The text encoder whose outputs can be cached while the others train (FLUX.1 / SD3: "te3", T5), with
    encode_apart(parts, captions) -> its share of encode_prompts; None where the family has none."""
    # train.xformers: False where the denoiser's attention runs on PyTorch SDPA whatever is set (SD3 / FLUX.1's
    # joint attention): the config is refused before loading rather than the key silently ignored
    xformers_attention: bool = True
    # sampling runs the denoiser once per step on the prompt alone (FLUX.1's distilled guidance input), not
    # twice for classifier-free guidance: what a sample costs in memory (the planner's sampling phase)
    distilled_guidance: bool = False
    # the denoiser's repeated block classes (names, as diffusers defines them): FSDP2 shards each such block as
    # its own unit (accelerate's transformer-based auto-wrap), so one block's weights are gathered at a time
    block_classes: tuple[str, ...] = ()
    # an LLM adapter in the denoiser (Anima's), which network_args train_llm_adapter=True adapts too (checked
    # before loading: other families refuse the key)
    has_llm_adapter: bool = False

    # ---- recognising and loading ------------------------------------------------------------------

    def claims(self, path: str) -> bool:
        """True if the checkpoint at `path` belongs to this family."""
        raise NotImplementedError

    def recognises(self, tensors: dict[str, TensorInfo]) -> bool:
        """True if a single file with these tensors (names and shapes from its header) is this family's."""
        raise NotImplementedError

    def single_file_problem(self, tensors: dict[str, TensorInfo], source: ModelSource) -> str | None:
        """Why load(source) would fail on a single file of this family with these tensors (shapes no shipped
        architecture has, parts neither in the file nor named by a key), from its header alone; None if none."""
        return None

    def load(self, source: ModelSource) -> Components:
        raise NotImplementedError

    def planning_parts(self, arch: Path) -> Components:
        """The parts of the architecture in `arch` (diffusers layout of configs) with random-init weights and
        stand-in tokenizers, for the memory planner: what load() returns, minus the weights."""
        return components_from_configs(arch, self.text_encoder_folders)

    # ---- files ------------------------------------------------------------------------------------

    def file_metadata(self, parts: Components) -> dict[str, str]:
        """ss_base_model_version, modelspec.architecture (without "/lora") and the like."""
        raise NotImplementedError

    def adapter_targets(self, parts: Components) -> list[AdapterTarget]:
        raise NotImplementedError

    def single_file_state_dict(self, parts: Components) -> dict[str, torch.Tensor]:
        """The model's weights in the single-file layout UIs load (built on the host)."""
        raise NotImplementedError

    def separate_files(self, parts: Components) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
        """Text encoders the single file leaves out, as the files UIs load beside it: component -> (file name,
        weights). None by default: the single file holds everything."""
        return {}

    def pipeline(self, parts: Components, scheduler=None):
        """The diffusers pipeline of the parts (sampling, saving as a diffusers folder)."""
        raise NotImplementedError

    # ---- the training step ------------------------------------------------------------------------

    def encode_prompts(self, parts: Components, captions: list[str], clip_skip: int) -> dict[str, torch.Tensor]:
        """Text conditioning of a batch of captions, as a dict of batched tensors. Families with a
        cached_apart encoder also take its encode_apart output (t5=...) instead of running it."""
        raise NotImplementedError

    def encode_apart(self, parts: Components, captions: list[str]) -> dict[str, torch.Tensor]:
        """The cached_apart encoder's share of encode_prompts; only called where cached_apart is set."""
        raise NotImplementedError(f"the {self.name} family caches no text encoder apart")

    takes_control_images: bool = False
    """Edit models (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit): conditioning_for_batch reads the batch's
    control_latents (a dataset with control_directory); other families' configs with control images are refused."""

    def conditioning_for_batch(self, parts: Components, batch: dict, conditioning: dict[str, torch.Tensor],
                               latents: torch.Tensor) -> dict[str, torch.Tensor]:
        """encode_prompts' (or the cache's) text conditioning plus what the family takes from the batch
        itself (SDXL: each example's original_size / crop_top_left / target_size); `latents` give the
        trained size where the batch has none. What predict() receives. By default: the text conditioning, with
        the batch's control (reference) latents for a family that takes_control_images."""
        if self.takes_control_images and "control_latents" in batch:
            return {**conditioning, "control_latents": batch["control_latents"]}
        return conditioning

    def encode_images(self, parts: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> scaled latents."""
        raise NotImplementedError

    def objective(self, parts: Components):
        """The noising and target rule the denoiser is trained with (library.objectives)."""
        raise NotImplementedError

    def predict(self, parts: Components, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, parts: Components, prompt: str, width: int, height: int, steps: int, seed: int,
               sampler: str, clip_skip: int, negative_prompt: str = "", guidance_scale: float = 7.5,
               guidance: float | None = None, control_image: str | None = None):
        """One image (PIL) from the model as it is; `guidance` is the distilled-guidance input (FLUX)."""
        raise NotImplementedError

    # ---- memory -----------------------------------------------------------------------------------

    def swappable_blocks(self, parts: Components) -> list[nn.Module]:
        """The blocks train.blocks_to_swap may keep on the host between uses, in execution order; none by
        default (a U-Net's blocks differ too much in size to swap evenly)."""
        return []

    def blocks_to_swap(self, parts: Components, count: int) -> list[nn.Module]:
        """The blocks train.blocks_to_swap = count keeps on the host, in execution order: `count` of the
        swappable blocks, evenly spread (SD3: joint blocks, as sd-scripts counts them); all of them when count
        exceeds them."""
        from library.block_swap import spread

        blocks = self.swappable_blocks(parts)
        return [blocks[k] for k in spread(len(blocks), min(count, len(blocks)))]

    def decode_latents(self, parts: Components, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) the VAE decodes from `latents` as they are given (what the planner's sampling
        phase runs); families whose VAE needs more than that (Qwen-Image: a 3D VAE, normalized latents) say how."""
        return parts.vae.decode(latents).sample


REGISTRY: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    REGISTRY[family.name] = family
    return family


def is_single_file(path: str) -> bool:
    return Path(path).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class _PlanTokenizer:
    """Stands in for a tokenizer in a plan (none ships with the architectures): ids of the full padded length."""

    def __init__(self, max_length: int):
        self.model_max_length = max_length

    def apply_chat_template(self, messages, tokenize=False, max_length=None, **_):  # chat-rendered captions
        return self(messages, max_length) if tokenize else str(messages)

    def __call__(self, captions, max_length=None, **_):
        ids = torch.zeros((len(captions), max_length or self.model_max_length), dtype=torch.long)
        return type("Tokens", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})()


def components_from_configs(arch: Path, text_encoder_folders: dict[str, str]) -> Components:
    """Components of the architecture in `arch` (diffusers layout of configs), random-init weights on the
    current (fake) device, text encoders named by `text_encoder_folders` (diffusers subfolder -> our name)."""
    import json

    import diffusers
    import transformers

    modules, scheduler = {}, None
    for sub in sorted(p for p in arch.iterdir() if p.is_dir()):
        config_path = next((sub / n for n in ("config.json", "scheduler_config.json") if (sub / n).is_file()), None)
        if config_path is None:  # tokenizer folders
            continue
        config = json.loads(config_path.read_text())
        if "scheduler" in sub.name:
            scheduler = getattr(diffusers, config["_class_name"]).from_pretrained(str(arch), subfolder=sub.name)
        elif "_class_name" in config:
            cls = getattr(diffusers, config["_class_name"])
            modules[sub.name] = cls.from_config(cls.load_config(str(arch), subfolder=sub.name))
        else:
            cls = getattr(transformers, config["architectures"][0])
            modules[sub.name] = cls(transformers.AutoConfig.from_pretrained(str(sub)))
    text = {text_encoder_folders.get(k, k): m for k, m in modules.items() if k.startswith("text_encoder")}
    tokenizers = {name: _PlanTokenizer(getattr(m.config, "max_position_embeddings", 512)) for name, m in text.items()}
    denoiser = next(modules[k] for k in ("unet", "transformer") if k in modules)
    return Components(denoiser=denoiser, vae=modules["vae"], text_encoders=text, tokenizers=tokenizers,
                      noise_scheduler=scheduler, source=ModelSource(str(arch)),
                      extra={"arch": str(arch), "v2": "sd2" in arch.name})
