"""The typed schema of a training TOML, its strict checks of names and types, and `--set` overrides (reading
files, sd-scripts input and the checks of combinations: library/config_files.py). Imports nothing of ours
but sd-scripts' vocabulary (for "did you mean").

A config file has sections ([model], [network], [dataset], [optimizer], [train], [save], [sample],
[logging]); every key keeps the name sd-scripts uses for the same thing. Defaults live here and
nowhere else. Everything is checked before any model is loaded: an unknown key or a wrong type here,
a missing path or an impossible combination in library/config_checks.py; each raises ConfigError naming
the key and the file.

A flat sd-scripts training TOML (keys at the top level, or under section names of its own such as
[model_arguments]) is accepted too: each supported key is mapped to its section, and every key we do
not support is named in one error.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union



class ConfigError(Exception):
    """A problem with the user's configuration; the CLI prints it and exits with code 2."""


def opt(default, help: str, choices: tuple | None = None, path: str | None = None):
    """A schema field: its default, one line of help (README's option table) and checks.

    path="file" / "dir" / "exists": the value must name an existing file / folder / either.
    """
    meta = {"help": help, "choices": choices, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


REQUIRED = dataclasses.MISSING
# model.base_model_precision: what users type (ours, and the peers' spellings that mean the same storage:
# SimpleTuner's base_model_precision values) -> the storage library/quantization.py makes
BASE_MODEL_PRECISIONS = {"no_change": "no_change", "int8": "int8", "nf4": "nf4", "nf4-bnb": "nf4",
                         "int8-quanto": "int8", "int8-torchao": "int8"}
# model.t5xxl_precision (the large text encoder while it encodes): ours, and the same peers' spellings
TEXT_ENCODER_PRECISIONS = {"auto": "auto", "no_change": "auto", "fp8": "fp8", "int8": "int8", "nf4": "nf4",
                           "nf4-bnb": "nf4", "int8-quanto": "int8", "int8-torchao": "int8"}

# ---------------------------------------------------------------------------------------------
# The schema. Section dataclasses, then the whole config.
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    pretrained_model_name_or_path: str = opt(
        REQUIRED, "base model: a diffusers folder, a single-file .safetensors/.ckpt, or a hub id")
    family: str = opt("auto", "model family; auto detects it from the files",
                      choices=("auto", "sd1", "sdxl", "sd3", "flux", "chroma", "flux2", "qwen_image", "zimage",
                               "anima"))
    v2: bool = opt(False, "SD2.x architecture (OpenCLIP text encoder); detected from single files")
    v_parameterization: bool = opt(False, "the model predicts v (SD2 768-v models) instead of noise")
    clip_skip: int = opt(1, "use the output of the N-th text-encoder layer from the end (2 for anime models)")
    tokenizer: Optional[str] = opt(
        None, "tokenizer folder or hub id (from the local cache) for single-file models")
    arch: Optional[str] = opt(
        None, "architecture for single files: a shipped name (sd15, sd2, sdxl) or a diffusers folder of configs")
    vae: Optional[str] = opt(None, "a separate VAE (.safetensors or diffusers folder)", path="exists")
    clip_l: Optional[str] = opt(None, "FLUX.1 / SD3 single files: the CLIP-L text encoder file (.safetensors)",
                                path="exists")
    clip_g: Optional[str] = opt(None, "SD3 single files: the CLIP-G text encoder file (.safetensors)", path="exists")
    t5xxl: Optional[str] = opt(None, "FLUX.1 / SD3 single files: the T5-XXL text encoder file (.safetensors)",
                               path="exists")
    ae: Optional[str] = opt(None, "FLUX.1 / Chroma / FLUX.2 / Z-Image single files: the autoencoder file "
                            "(ae.safetensors)", path="exists")
    text_encoder: Optional[str] = opt(
        None, "FLUX.2 / Qwen-Image / Z-Image single files: the text encoder file (FLUX.2: Qwen3 for klein, "
        "Mistral-Small-3 for dev; Qwen-Image: Qwen2.5-VL, ComfyUI's qwen_2.5_vl_7b.safetensors; Z-Image: Qwen3-4B, "
        "ComfyUI's qwen_3_4b.safetensors) or a transformers folder", path="exists")
    max_token_length: Optional[int] = opt(
        None, "SD1 / SD2 / SDXL: tokens per caption: 75 (one CLIP window, the default), 150 or 225 (longer captions "
        "encoded in 75-token windows and joined, as sd-scripts does)", choices=(75, 150, 225))
    weighted_captions: bool = opt(
        False, "SD1 / SD2 / SDXL: \"(word:1.2)\", \"(word)\" (x1.1) and \"[word]\" (/1.1) in captions weight those "
        "tokens' text-encoder states, as sd-scripts does")
    t5xxl_max_token_length: Optional[int] = opt(
        None, "T5 tokens per caption (default: 512 for FLUX.1-dev, 256 for schnell, 256 for SD3)")
    apply_t5_attn_mask: bool = opt(False, "mask T5 padding tokens in the encoder and in the denoiser's attention")
    t5xxl_precision: str = opt(
        "auto", "the large text encoder's weight storage while it encodes captions (T5-XXL; FLUX.2's Qwen3 / "
        "Mistral, Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3): auto (the weights' dtype; T5 9.5 GB in bf16), fp8 "
        "(float8, computed in the autocast dtype) or int8 (bitsandbytes LLM.int8): ~half; nf4 (bitsandbytes 4-bit "
        "NormalFloat): ~a quarter. SimpleTuner's spellings no_change, nf4-bnb, int8-quanto, int8-torchao are read "
        "as these",
        choices=tuple(TEXT_ENCODER_PRECISIONS))
    base_model_precision: str = opt(
        "no_change", "train_network.py (QLoRA): store the frozen denoiser's and text encoders' Linear weights "
        "quantized through bitsandbytes, adapters in full precision on top: int8 (LLM.int8, ~1 byte per weight) or "
        "nf4 (4-bit NormalFloat, ~0.52 byte per weight); convolutions, norms and embeddings keep their precision. "
        "SimpleTuner's spellings nf4-bnb, int8-quanto, int8-torchao are read as these; for fp8 see train.fp8_base",
        choices=tuple(BASE_MODEL_PRECISIONS))
    guidance_scale: float = opt(3.5, "FLUX.1-dev / FLUX.2-dev: the distilled-guidance value the model is given in "
                                     "training")
    t5_tokenizer: Optional[str] = opt(
        None, "Anima: the T5 tokenizer folder whose ids the LLM adapter reads (sd-scripts' t5_tokenizer_path); default "
        "model.tokenizer's t5_tokenizer/, else the local cache", path="exists")
    llm_adapter: Optional[str] = opt(
        None, "Anima: a separate LLM adapter file (sd-scripts' llm_adapter_path), used instead of the DiT file's own",
        path="exists")


@dataclass
class NetworkSection:
    network_module: str = opt("networks.lora", "adapter kind: networks.lora (LoRA, LoCon with conv_dim) or "
                              "lycoris.kohya (algo picks the LyCORIS algorithm)",
                              choices=("networks.lora", "lycoris.kohya"))
    algo: Optional[str] = opt(None, "adapter algorithm (as LyCORIS' algo=); default lora, or locon with lycoris.kohya",
                              choices=("lora", "locon", "loha", "lokr", "oft", "boft", "dora"))
    network_dim: int = opt(4, "LoRA rank of attention/MLP linears")
    network_alpha: float = opt(1.0, "LoRA alpha; the adapter output is scaled by alpha / dim, as in kohya")
    network_dropout: Optional[float] = opt(None, "dropout on the adapter input (peft lora_dropout)")
    conv_dim: Optional[int] = opt(None, "LoCon: rank of 3x3 conv layers in ResNet/up/down blocks")
    conv_alpha: Optional[float] = opt(None, "LoCon: alpha of conv layers (defaults to 1.0)")
    network_args: list[str] = opt([], 'extra "key=value" strings, as sd-scripts / LyCORIS write them '
                                  '(algo, conv_dim, factor, block_dims, loraplus_lr_ratio, ...; any key of this table)')
    rank_dropout: Optional[float] = opt(None, "dropout of whole ranks (rows of the delta) during training (LoRA, "
                                        "LoCon, LoHa, LoKr)")
    module_dropout: Optional[float] = opt(None, "probability of skipping a layer's adapter in a training step "
                                          "(LoRA, LoCon, LoHa, LoKr, OFT, BOFT)")
    factor: Optional[int] = opt(None, "LoKr: Kronecker factor size (-1: near the square root); BOFT: butterfly factor")
    decompose_both: Optional[bool] = opt(None, "LoKr: low-rank factor the small Kronecker matrix (lokr_w1) too")
    use_tucker: Optional[bool] = opt(None, "LoHa / LoKr: Tucker-decompose 3x3 conv kernels (LoHa: hada_t1; LoKr files store the plain product)")
    dora_wd: Optional[bool] = opt(None, "DoRA: weight-decomposed LoRA (same as algo = dora)")
    block_dims: Optional[list[int]] = opt(None, "ranks of the 25 U-Net blocks IN00-IN11, MID, OUT00-OUT11 "
                                          "(0 leaves a block out)")
    block_alphas: Optional[list[float]] = opt(None, "alphas of the 25 U-Net blocks (with block_dims)")
    conv_block_dims: Optional[list[int]] = opt(None, "3x3-conv ranks of the 25 U-Net blocks (LoCon per block)")
    conv_block_alphas: Optional[list[float]] = opt(None, "3x3-conv alphas of the 25 U-Net blocks")
    down_lr_weight: Optional[Union[str, list[float]]] = opt(
        None, "lr multipliers of the 12 down blocks, or a preset: cosine, sine, linear, reverse_linear, zeros (+x)")
    mid_lr_weight: Optional[float] = opt(None, "lr multiplier of the mid block")
    up_lr_weight: Optional[Union[str, list[float]]] = opt(None, "lr multipliers of the 12 up blocks, or a preset")
    loraplus_lr_ratio: Optional[float] = opt(None, "LoRA+: lora_up (B) learns this many times faster than lora_down")
    scale_weight_norms: Optional[float] = opt(None, "max-norm: scale down any layer whose weight delta has a larger "
                                              "norm, after each step (1.0 is typical)")
    network_weights: Optional[str] = opt(None, "continue from this adapter file (kohya / LyCORIS or peft layout; "
                                               "same algorithm and shapes)", path="file")
    network_train_unet_only: bool = opt(False, "train the U-Net adapter only")
    network_train_text_encoder_only: bool = opt(False, "train the text-encoder adapter only")
    unet_lr: Optional[float] = opt(None, "learning rate of the U-Net adapter (default: learning_rate)")
    text_encoder_lr: Optional[Union[float, list[float]]] = opt(
        None, "learning rate of the text-encoder adapters (default: learning_rate); a list gives one per encoder "
        "in order (SDXL: [te1, te2]; FLUX.1 / SD3: [clip_l, ...]), a shorter list repeats its last")


@dataclass
class DatasetSection:
    train_data_dir: Optional[str] = opt(
        None, "folder of images with captions; subfolders 'N_name' repeat N times (or use dataset_config)",
        path="dir")
    dataset_config: Optional[str] = opt(
        None, "sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]); replaces train_data_dir",
        path="file")
    reg_data_dir: Optional[str] = opt(None, "regularization images, in subfolders 'N_name' as train_data_dir",
                                      path="dir")
    in_json: Optional[str] = opt(
        None, "fine-tune metadata (.json / .jsonl: caption and tags per image key) captioning train_data_dir's "
              "images, as sd-scripts' fine_tune datasets (num_repeats repeats them)", path="file")
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images")
    resolution: Union[int, list[int]] = opt(512, "training size: an int, or [width, height]")
    num_repeats: int = opt(1, "repeats of images placed directly in train_data_dir")
    caption_extension: str = opt(".txt", "caption file extension (.txt or .caption)")
    train_batch_size: int = opt(1, "images per batch")
    cache_latents: bool = opt(False, "encode all images with the VAE once, before training")
    max_data_loader_n_workers: int = opt(0, "DataLoader worker processes")
    enable_bucket: bool = opt(False, "aspect-ratio buckets: each image trains at the bucket size nearest its shape")
    min_bucket_reso: int = opt(256, "smallest bucket side")
    max_bucket_reso: int = opt(1024, "largest bucket side")
    bucket_reso_steps: int = opt(64, "bucket sides are multiples of this (a multiple of 8)")
    bucket_no_upscale: bool = opt(False, "never enlarge an image: its bucket is its own size rounded down")
    shuffle_caption: bool = opt(False, "shuffle the tags of each caption (after the kept ones)")
    caption_separator: str = opt(",", "what separates the tags of a caption")
    keep_tokens: int = opt(0, "the first N tags stay in place (not shuffled or dropped)")
    keep_tokens_separator: str = opt(
        "", "tags before this mark stay in place, and after a second one stay at the end (e.g. \"|||\")")
    caption_prefix: Optional[str] = opt(None, "text put before every caption (never shuffled or dropped)")
    caption_suffix: Optional[str] = opt(None, "text put after every caption (never shuffled or dropped)")
    caption_dropout_rate: float = opt(0.0, "probability of training an example with an empty caption")
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each movable tag")
    caption_dropout_every_n_epochs: int = opt(0, "train every N-th epoch with empty captions (0: never)")
    token_warmup_min: int = opt(1, "token warmup: movable tags a caption keeps at step 0 (sd-scripts' token_warmup_min)")
    token_warmup_step: float = opt(0.0, "token warmup: the step (a fraction below 1: of max_train_steps) by which "
                                        "captions grow from token_warmup_min tags to all of them (0: off)")
    flip_aug: bool = opt(False, "flip images horizontally at random (half the examples)")
    color_aug: bool = opt(False, "shift the hue at random (not with cached latents)")
    random_crop: bool = opt(False, "crop at a random place instead of the center (not with cached latents)")
    alpha_mask: bool = opt(False, "the alpha channel weights the loss (transparent pixels do not train)")
    masked_loss: bool = opt(False, "mask images weight the loss: the red channel (0-255 -> 0-1) of the image with "
                                   "each image's stem in conditioning_data_dir (sd-scripts' masked_loss)")
    conditioning_data_dir: Optional[str] = opt(None, "masked_loss: the folder of mask images (same stems and sizes "
                                                     "as the training images)", path="dir")
    cache_latents_to_disk: bool = opt(False, "cache latents as files in cache_dir, reused while still valid")
    vae_batch_size: int = opt(1, "images per VAE call when caching latents")
    cache_dir: Optional[str] = opt(None, "folder of the disk caches (default: output_dir/cache)")
    control_directory: Optional[str] = opt(
        None, "edit pairs (FLUX.1 Kontext, FLUX.2): folder of control (reference) images, one per training image with "
        "the same file stem, each resized to its image's bucket (a dataset TOML sets it per subset)", path="dir")
    bad_data: str = opt("stop", "what the dataset check does with bad images and captions: stop with the "
                        "list, or skip them with a warning", choices=("stop", "skip"))
    check_decode: bool = opt(True, "the dataset check decodes every image fully (false: headers and file ends)")


@dataclass
class OptimizerSection:
    optimizer_type: str = opt(
        "AdamW", "AdamW, AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, Adafactor, "
        "Prodigy (case-insensitive), or a dotted class path such as torch.optim.RAdam")
    optimizer_args: list[str] = opt([], 'extra "key=value" optimizer arguments, e.g. "weight_decay=0.01"')
    learning_rate: float = opt(1e-4, "base learning rate")
    max_grad_norm: float = opt(1.0, "clip gradients to this norm (0 disables)")
    lr_scheduler: str = opt("constant", "learning-rate schedule",
                            choices=("constant", "constant_with_warmup", "linear", "cosine",
                                     "cosine_with_restarts", "polynomial", "cosine_with_min_lr",
                                     "warmup_stable_decay", "inverse_sqrt", "piecewise_constant"))
    lr_warmup_steps: Union[int, float] = opt(0, "warmup steps, or a fraction (<1) of max_train_steps")
    lr_decay_steps: Union[int, float] = opt(0, "warmup_stable_decay: steps of the final decay, or a fraction (<1) "
                                               "of max_train_steps; the rate is constant in between")
    lr_scheduler_min_lr_ratio: Optional[float] = opt(
        None, "cosine_with_min_lr (required) and warmup_stable_decay (unset: 0): the lowest rate, as a fraction of "
        "the base rate")
    lr_scheduler_timescale: Optional[int] = opt(None, "inverse_sqrt: the timescale in steps (unset: lr_warmup_steps, "
                                                      "or 10000 without warmup)")
    lr_scheduler_num_cycles: int = opt(1, "cycles of cosine_with_restarts; half-waves of cosine_with_min_lr and "
                                          "warmup_stable_decay's decay (1: down once), as in sd-scripts")
    lr_scheduler_power: float = opt(1.0, "power of the polynomial schedule")
    lr_scheduler_type: Optional[str] = opt(
        None, "a scheduler class instead of lr_scheduler: a torch.optim.lr_scheduler name (CosineAnnealingLR) or a "
        "dotted class path, made with (optimizer, **lr_scheduler_args); no warmup")
    lr_scheduler_args: list[str] = opt([], 'extra "key=value" arguments of the schedule (Python literals), e.g. '
                                           '"T_max=1000" for lr_scheduler_type, "num_cycles=0.5" for cosine, '
                                           '"step_rules=\'1:10,0.1\'" for piecewise_constant')
    fused_backward_pass: bool = opt(
        False, "train_db.py: update each parameter in its own gradient hook and free its gradient at once")
    fused_optimizer_groups: Optional[int] = opt(
        None, "train_db.py: N optimizer groups, each stepped when its gradients are complete, then freed")
    offload_optimizer_state: bool = opt(
        False, "train_db.py, with fused_backward_pass / fused_optimizer_groups: keep the optimizer state in CPU "
        "memory between steps; each chunk's state comes to the GPU for its step and goes back")


@dataclass
class TrainSection:
    output_dir: str = opt(REQUIRED, "where the adapter, the resolved config and samples are written")
    output_name: str = opt("last", "file name of the saved adapter, without extension")
    max_train_steps: int = opt(1600, "optimizer steps to train")
    max_train_epochs: Optional[int] = opt(None, "if set, overrides max_train_steps")
    seed: Optional[int] = opt(None, "random seed (a random one is drawn and recorded if unset)")
    gradient_accumulation_steps: int = opt(1, "batches per optimizer step")
    initial_step: Optional[int] = opt(None, "with skip_until_initial_step: start at this optimizer step, on the data a "
                                            "full run has there (sd-scripts' initial_step)")
    initial_epoch: Optional[int] = opt(None, "with skip_until_initial_step: start at the first step of this epoch "
                                             "(1: the first; initial_step wins)")
    skip_until_initial_step: bool = opt(False, "skip the batches before initial_step / initial_epoch (the schedule "
                                               "starts from its beginning, as in sd-scripts without resume)")
    nan_skip_limit: int = opt(5, "skip steps with NaN/inf loss or gradients; stop after this many in a row")
    validation_split: float = opt(
        0.0, "train_network.py: hold out this fraction of each training subset's images (drawn with "
        "validation_seed); their loss at fixed noise and timesteps is printed and logged as the validation loss")
    validation_seed: Optional[int] = opt(None, "which images are held out, and the validation noise (default: seed)")
    validate_every_n_steps: Optional[int] = opt(None, "also compute the validation loss every N steps")
    validate_every_n_epochs: Optional[int] = opt(None, "compute it every N epochs (default: every epoch)")
    max_validation_steps: Optional[int] = opt(None, "at most this many validation batches of train_batch_size")
    mixed_precision: str = opt("no", "autocast precision", choices=("no", "fp16", "bf16"))
    full_fp16: bool = opt(False, "keep trainable weights in fp16 too (needs mixed_precision=fp16)")
    full_bf16: bool = opt(False, "keep trainable weights in bf16 too (needs mixed_precision=bf16)")
    no_half_vae: bool = opt(False, "keep the VAE in fp32 under mixed precision (the SDXL VAE gives NaN / black "
                            "images in fp16)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, ~20% slower")
    sdpa: bool = opt(True, "PyTorch scaled-dot-product attention")
    xformers: bool = opt(False, "xformers memory-efficient attention (pip install xformers)")
    cache_text_encoder_outputs: bool = opt(
        False, "encode all captions once; needs frozen text encoders (network_train_unet_only), except FLUX.1 / "
        "SD3 LoRA, where T5 alone is cached while the CLIP adapters train (as sd-scripts)")
    fp8_base: bool = opt(
        False, "adapter training: store the frozen denoiser's Linear weights as float8_e4m3fn, computed layer by "
        "layer in the autocast dtype (needs mixed_precision bf16 or fp16); halves the denoiser's weights. The "
        "denoiser only: text encoders keep their precision (sd-scripts' fp8_base_unet; its fp8_base is read as "
        "this too; model.t5xxl_precision stores T5 smaller). Adapters stay in full precision")
    blocks_to_swap: int = opt(
        0, "keep N of the denoiser's blocks (SD3, FLUX.1: 57 = 19 double + 38 single) in CPU memory, each brought "
        "to the GPU just before it runs (forward and checkpointed backward) and sent back after; needs "
        "gradient_checkpointing, and in train_db.py the fused backward pass. Slower by the PCIe copies")
    cpu_offload_checkpointing: bool = opt(
        False, "with gradient_checkpointing: keep the checkpointed blocks' inputs in CPU memory until backward "
        "(fewer activations on the GPU; slower by the copies)")
    cache_text_encoder_outputs_to_disk: bool = opt(
        False, "cache text-encoder outputs as files in cache_dir, reused while still valid")
    ddp_timeout: int = opt(
        180, "several processes: minutes a process waits for the others (rank 0 caching latents or making class "
        "images) before the process group gives up; sd-scripts' key, here with a default past PyTorch's 10 minutes")
    ddp_gradient_as_bucket_view: bool = opt(
        False, "several processes: gradients are views into DDP's all-reduce buckets (saves one gradient copy)")
    ddp_static_graph: bool = opt(
        False, "several processes: tell DDP the same parameters are used in every step (lets it skip the search for "
        "unused ones after the first step)")
    torch_compile: bool = opt(
        False, "compile the denoiser's repeated blocks with torch.compile (regional compilation: each kind of "
        "block once); faster steps after a compile of a few minutes at the first steps")
    dynamo_backend: str = opt("inductor", "torch.compile backend with torch_compile (sd-scripts' key): inductor; "
                              "eager / aot_eager to debug; no: do not compile",
                              choices=("inductor", "eager", "aot_eager", "cudagraphs", "no"))


@dataclass
class SaveSection:
    save_every_n_steps: Optional[int] = opt(None, "also save name-step{N:08d}.safetensors every N steps")
    save_every_n_epochs: Optional[int] = opt(None, "also save name-{N:06d}.safetensors every N epochs")
    save_n_epoch_ratio: Optional[int] = opt(
        None, "save about N times over the run: save_every_n_epochs = epochs // N (at least 1), as sd-scripts")
    save_precision: str = opt("float", "dtype of saved weights", choices=("float", "fp16", "bf16"))
    save_model_as: str = opt(
        "safetensors", "safetensors: one file (train_db.py: in the original layout UIs load); diffusers: a "
        "diffusers folder (train_db.py only)", choices=("safetensors", "diffusers"))
    overwrite: bool = opt(False, "replace adapter files of the same output_name (default: refuse to start)")
    save_state: bool = opt(False, "with every save, also save a resumable state folder (name-step00000500-state)")
    save_last_n_steps: Optional[int] = opt(None, "keep only the newest N step saves (files and states)")
    save_last_n_epochs: Optional[int] = opt(None, "keep only the newest N epoch saves (files and states)")
    resume: Optional[str] = opt(None, "continue from a state folder, or \"latest\" (newest in output_dir)")
    resume_with_changed_data: bool = opt(
        False, "resume even though images or captions changed since the state was saved: the run continues at "
        "the saved step with a new epoch order (otherwise such a resume is refused, naming what changed)")
    no_metadata: bool = opt(False, "the saved file keeps only the ss_* keys a loader needs (module, dim, alpha, "
                            "args, base model) and modelspec.*")
    training_comment: Optional[str] = opt(None, "written to the saved file as ss_training_comment")
    metadata_title: Optional[str] = opt(None, "modelspec.title of the saved file (default: output_name)")
    metadata_author: Optional[str] = opt(None, "modelspec.author of the saved file")
    metadata_description: Optional[str] = opt(None, "modelspec.description of the saved file")
    metadata_license: Optional[str] = opt(None, "modelspec.license of the saved file")
    metadata_tags: Optional[str] = opt(None, "modelspec.tags of the saved file (comma-separated)")
    metadata_usage_hint: Optional[str] = opt(None, "modelspec.usage_hint of the saved file")
    metadata_thumbnail: Optional[str] = opt(None, "modelspec.thumbnail of the saved file")
    metadata_merged_from: Optional[str] = opt(None, "modelspec.merged_from of the saved file")
    metadata_trigger_phrase: Optional[str] = opt(None, "modelspec.trigger_phrase of the saved file")
    metadata_preprocessor: Optional[str] = opt(None, "modelspec.preprocessor of the saved file")
    metadata_is_negative_embedding: Optional[str] = opt(None, "modelspec.is_negative_embedding of the saved file")
    save_format: str = opt("kohya", "adapter key layout: kohya (kohya / LyCORIS names every UI loads) or peft "
                           "(peft / diffusers names; DoRA, OFT and BOFT in this layout reload only here)", choices=("kohya", "peft"))


@dataclass
class SampleSection:
    sample_prompts: Optional[str] = opt(
        None, "prompt file (.txt with --n/--w/--h/--d/--s/--l/--g/--ss flags, .toml, .json); checked at start, "
        "sampled at the end and as the keys below say", path="file")
    sample_every_n_steps: Optional[int] = opt(None, "also sample every N steps")
    sample_every_n_epochs: Optional[int] = opt(None, "also sample at the end of every N-th epoch")
    sample_at_first: bool = opt(False, "also sample before the first step (the base model)")
    sample_steps: int = opt(20, "denoising steps for samples (a prompt's --s overrides)")
    sample_sampler: str = opt("ddim", "scheduler for samples (a prompt's --ss overrides)",
                              choices=("ddim", "euler", "euler_a", "k_euler", "k_euler_a", "dpmsolver++",
                                       "dpmsolver", "k_dpm_2", "k_dpm_2_a", "lms", "k_lms", "heun", "pndm",
                                       "dpmsingle"))
    sample_seed: int = opt(1234, "seed of the first prompt without --d (then +1 per prompt)")
    sample_tiled_vae: bool = opt(
        False, "decode samples in overlapping 512 px tiles (256 px at 512 px and below; diffusers' VAE tiling): "
        "less memory while sampling during training, faint seams possible (over 1024 px samples always tile)")


@dataclass
class LoggingSection:
    logging_dir: Optional[str] = opt(None, "tensorboard folder (default: output_dir/logs when log_with asks)")
    log_with: Optional[str] = opt(None, "tensorboard or wandb", choices=("tensorboard", "wandb"))
    log_prefix: Optional[str] = opt(None, "prefix of the run name in the logs")
    log_every_n_steps: int = opt(0, "in a log file (not a terminal), print a line every N steps (0: ~20 lines)")
    report_denoising_loss: bool = opt(
        False, "before and after training, print the loss on the training images at fixed timesteps and noise")


@dataclass
class LossSection:
    loss_type: str = opt("l2", "per-element loss", choices=("l2", "l1", "huber", "smooth_l1"))
    huber_c: float = opt(0.1, "huber / smooth_l1 threshold c (scaled by the schedule)")
    huber_schedule: str = opt("snr", "how c varies with the timestep", choices=("constant", "exponential", "snr"))
    huber_scale: float = opt(1.0, "multiplies the scheduled huber threshold")
    min_snr_gamma: Optional[float] = opt(None, "Min-SNR weighting: weight min(SNR, gamma) / SNR (5 is common)")
    debiased_estimation_loss: bool = opt(False, "weight the loss by 1 / sqrt(SNR)")
    scale_v_pred_loss_like_noise_pred: bool = opt(False, "v-prediction: weight by SNR / (SNR + 1)")
    noise_offset: Optional[float] = opt(None, "add offset * N(0,1) per sample and channel to the noise (0.05-0.1)")
    noise_offset_random_strength: bool = opt(False, "scale noise_offset by a U(0, 1) draw, once per batch")
    adaptive_noise_scale: Optional[float] = opt(
        None, "add this times abs(mean of each latent channel) to noise_offset, per sample (the sum floored at 0; "
        "needs noise_offset)")
    multires_noise_iterations: Optional[int] = opt(None, "pyramid noise levels (6-10)")
    multires_noise_discount: float = opt(0.3, "weight decay per pyramid level")
    ip_noise_gamma: Optional[float] = opt(None, "input perturbation: noise the latents with extra gamma * N(0,1)")
    ip_noise_gamma_random_strength: bool = opt(False, "scale ip_noise_gamma by a U(0, 1) draw, once per batch")
    min_timestep: int = opt(0, "lowest timestep trained")
    max_timestep: Optional[int] = opt(None, "timesteps are drawn below this (default: all 1000)")
    zero_terminal_snr: bool = opt(False, "rescale the noise schedule to zero SNR at the last step (use with v-pred)")
    timestep_sampling: Optional[str] = opt(
        None, "flow matching (FLUX.1, SD3, Qwen-Image): how s is drawn (default sigma; Qwen-Image: qwen_shift)",
        choices=("sigma", "uniform", "sigmoid", "shift", "flux_shift", "qwen_shift"))
    sigmoid_scale: Optional[float] = opt(None, "flow matching: scale of N(0,1) before the sigmoid (default 1.0)")
    discrete_flow_shift: Optional[float] = opt(
        None, "flow matching: shift s -> shift s / (1 + (shift - 1) s) of sigma / shift sampling (default 3.0)")
    model_prediction_type: Optional[str] = opt(
        None, "flow matching: raw (the velocity), additive (+ x_t) or sigma_scaled (x_t - s output; "
        "weighted by weighting_scheme) (default sigma_scaled)", choices=("raw", "additive", "sigma_scaled"))
    weighting_scheme: Optional[str] = opt(
        None, "flow matching: density of s for sigma sampling (logit_normal, mode) or loss weight with sigma_scaled "
        "(sigma_sqrt, cosmap) (default none)",
        choices=("none", "uniform", "sigma_sqrt", "logit_normal", "mode", "cosmap"))
    logit_mean: Optional[float] = opt(None, "flow matching: mean of logit_normal (default 0.0)")
    logit_std: Optional[float] = opt(None, "flow matching: std of logit_normal (default 1.0)")
    mode_scale: Optional[float] = opt(None, "flow matching: scale of the mode density (default 1.29)")


@dataclass
class DreamboothSection:
    train_text_encoder: bool = opt(True, "train_db.py: fine-tune the text encoder too")
    learning_rate_te: Optional[float] = opt(None, "train_db.py: text-encoder learning rate (default: learning_rate)")
    learning_rate_te2: Optional[float] = opt(None, "train_db.py: SDXL's second text encoder's learning rate "
                                                   "(default: learning_rate_te)")
    stop_text_encoder_training: Optional[int] = opt(None, "train_db.py: freeze the text encoder after N steps")
    class_data_dir: Optional[str] = opt(
        None, "prior preservation: folder of class images (the regularization images, weighted by "
        "prior_loss_weight); missing ones are generated here once")
    class_prompt: Optional[str] = opt(None, "prompt (and caption) of generated class images, e.g. 'a photo of a dog'")
    num_class_images: int = opt(0, "generate class images until the folder holds this many")
    use_ema: bool = opt(False, "keep an exponential moving average of the trained weights, saved beside them as "
                        "name-ema: train_db.py the model's (on the CPU), train_network.py the adapter's")
    ema_decay: float = opt(0.9999, "EMA decay per step")
    ema_update_every: int = opt(
        1, "train_db.py: update the EMA every N steps (with decay ** N, the same averaging time): on the CPU each "
        "update copies every trained weight from the GPU (SDXL's U-Net: 10 GB, about 1 s), so N divides that cost")
    ema_on_device: bool = opt(
        False, "train_db.py: keep the EMA on the GPU: no copies, but one more fp32 copy of the trained weights "
        "there (SDXL's U-Net: +10 GB)")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "network": NetworkSection,
    "dataset": DatasetSection,
    "optimizer": OptimizerSection,
    "train": TrainSection,
    "save": SaveSection,
    "sample": SampleSection,
    "logging": LoggingSection,
    "loss": LossSection,
    "dreambooth": DreamboothSection,
}


@dataclass
class Config:
    model: ModelSection
    network: NetworkSection
    dataset: DatasetSection
    optimizer: OptimizerSection
    train: TrainSection
    save: SaveSection
    sample: SampleSection
    logging: LoggingSection
    loss: LossSection
    dreambooth: DreamboothSection
    source: str = "<config>"  # the file the config came from, for messages
    run_id: str = ""  # this run's id, in every file it writes (set by the output check; a resumed run keeps its own)
    data_fingerprint: Optional[dict] = None  # the data the run trains on, recorded in its states (training.py)
    notes: list = field(default_factory=list)  # one line each about sd-scripts keys, printed at start
    # sd-scripts input: the flat keys it set, false and empty values left out (None for our sectioned schema); some
    # keys are read by some of sd-scripts' scripts only (sd_flat.py: text_encoder_of_family, network_only_keys)
    sd_scripts_keys: Optional[frozenset] = None

    def to_toml_dict(self) -> dict:
        return {name: _section_to_dict(getattr(self, name)) for name in SECTIONS}


def _section_to_dict(section) -> dict:
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if getattr(section, f.name) is not None}


def schema_default(key: str):
    """The schema's default of a key (by name, in whichever section)."""
    cls = SECTIONS[key_to_section()[key]]
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    return f.default_factory() if f.default is REQUIRED else f.default


def key_to_section() -> dict[str, str]:
    """Every schema key name -> its section (names are unique across sections)."""
    return {f.name: sec for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------
# Loading (reading files and checking combinations: library/config_files.py)
# ---------------------------------------------------------------------------------------------


def read_text_file(path: Path) -> str:
    """A config file's text: UTF-8, with or without a BOM (Windows editors write one), or UTF-16 with its BOM;
    anything else is named."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}, in "
                          f"{data[max(0, e.start - 20):e.start]!r}...); save the file as UTF-8") from None


def did_you_mean(key: str) -> str:
    """A suggestion among our keys and sd-scripts' known ones, only for what looks like a typo."""
    from library.sd_vocab import VOCAB

    return _did_you_mean(key, [*key_to_section(), *VOCAB])


def _did_you_mean(key: str, candidates) -> str:
    """A close name with the same words, each spelled nearly alike: `network_dimm` -> `network_dim`, but
    never `max_token_length` -> `t5xxl_max_token_length` (another meaning with one word more)."""
    words = key.lower().split("_")
    close = [c for c in difflib.get_close_matches(key, list(candidates), n=5, cutoff=0.6)
             if _same_words(words, str(c).lower().split("_"))]
    if not close:
        return ""
    owner = key_to_section()
    where = f"{owner[close[0]]}.{close[0]}" if close[0] in owner else close[0]
    return f" (did you mean '{where}'?)"


def _same_words(words: list[str], other: list[str]) -> bool:
    if len(words) != len(other):
        return False
    return all(a == b or difflib.SequenceMatcher(None, a, b).ratio() >= 0.75 for a, b in zip(words, other))


def _apply_override(sections: dict[str, dict], item: str, source: str) -> None:
    """`section.key=value` or `key=value`; the value is read as TOML, else taken as a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    dotted, text = (s.strip() for s in item.split("=", 1))
    owner = key_to_section()
    if "." in dotted:
        section, key = dotted.split(".", 1)
    else:
        section, key = owner.get(dotted, ""), dotted
    if section not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise ConfigError(f"--set {dotted}: unknown key{did_you_mean(key)}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    sections.setdefault(section, {})[key] = value


def _build_section(name: str, values: dict, source: str):
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    for key in values:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{name}.{key}'{did_you_mean(key)}")
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for key, f in fields.items():
        if key in values:
            kwargs[key] = _check_value(f"{name}.{key}", values[key], hints[key], f.metadata, source)
        elif f.default is REQUIRED and f.default_factory is REQUIRED:
            raise ConfigError(f"{source}: missing required key '{name}.{key}' ({f.metadata['help']})")
    return cls(**kwargs)


def _check_value(key: str, value, hint, meta, source: str):
    if not _matches(value, hint):
        raise ConfigError(f"{source}: '{key}' must be {_describe(hint)}, got {type(value).__name__} {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and _is_float_only(hint):
        value = float(value)
    choices = meta.get("choices")
    if choices and value is not None:
        lowered = value.lower() if isinstance(value, str) else value
        if lowered not in [c.lower() if isinstance(c, str) else c for c in choices]:
            raise ConfigError(f"{source}: '{key}' = {value!r} is not one of: {', '.join(map(str, choices))}"
                              f"{_did_you_mean(str(value), choices)}")
    return value


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if origin is Union:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"schema type not handled: {hint}")


def _is_float_only(hint) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    return float in args and int not in args


def _describe(hint) -> str:
    if typing.get_origin(hint) is Union:
        return " or ".join(_describe(h) for h in typing.get_args(hint) if h is not type(None))
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def parse_kv_args(args: list[str]) -> dict[str, Any]:
    """["conv_dim=4", "decouple=True"] -> {"conv_dim": 4, "decouple": True} (values read as Python/TOML)."""
    out = {}
    for arg in args:
        key, text = (s.strip() for s in arg.split("=", 1))
        lowered = {"true": "true", "false": "false"}.get(text.lower(), text)
        try:
            out[key] = tomllib.loads(f"v = {lowered}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text
    return out


def optimizer_kwargs(args: list[str], key: str = "optimizer_args") -> dict[str, Any]:
    """optimizer_args (and lr_scheduler_args) read as sd-scripts reads them: each value is a Python literal
    (`betas=0.9,0.99` is the tuple (0.9, 0.99), `betas=[0.9,0.99]` a list); `true` / `false` are taken as
    True / False too."""
    import ast

    out = {}
    for arg in args:
        name, text = (s.strip() for s in arg.split("=", 1))
        text = {"true": "True", "false": "False"}.get(text.lower(), text)
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"'optimizer.{key}': {arg!r}: the value must be a Python literal "
                              f"(a number, True/False, a quoted string, a tuple such as 0.9,0.99)") from None
    return out


def options_markdown() -> str:
    """README's option table, generated from the schema (a test keeps README equal to it)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines += [f"**[{name}]**", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = "required" if f.default is REQUIRED and f.default_factory is REQUIRED else (
                repr(f.default_factory()) if f.default is REQUIRED else repr(f.default))
            default = default.replace("'", '"').replace("None", "unset").replace("True", "true").replace("False", "false")
            choices = f" One of: {', '.join(map(str, f.metadata['choices']))}." if f.metadata["choices"] else ""
            lines.append(f"| `{f.name}` | {_describe(hints[f.name])} | `{default}` | {f.metadata['help']}.{choices} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(options_markdown())
