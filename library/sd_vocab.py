"""sd-scripts' option vocabulary: what this trainer does with each option of sd-scripts' training scripts
(train_network, sdxl_train_network, sd3_train_network, flux_train_network, train_db, fine_tune, sdxl_train,
sd3_train, flux_train) that is not a key of our schema under the same name, and with the keys only the
kohya_ss GUI writes.

A data table and nothing else: library/sd_flat.py applies it to a flat TOML or to command-line flags.
Each entry says how the option is given on sd-scripts' command line (its argparse kind) and its status:

- mapped:  implemented under our name or by a conversion (library/sd_flat.py CONVERTERS);
- noop:    accepted at any value with the note: it changes nothing in training here (logging, upload
           cache bookkeeping, multi-GPU tuning), or a value in `harmless` that is sd-scripts' own default;
- refused: accepted silently at a value in `harmless` (sd-scripts' default: no effect there either);
           any other value stops with the note (why, and what to use instead);
- gui:     not read by any sd-scripts script (the kohya_ss GUI writes it): accepted, sd-scripts ignores it too.

Keys of our schema with the same name as sd-scripts' option are implemented and are not listed here.
"""
from __future__ import annotations

from dataclasses import dataclass

# command-line kinds, as sd-scripts' argparse reads each option
FLAG, INT, FLOAT, NUM, STR, LIST, FLOATS = "flag", "int", "float", "num", "str", "list", "floats"


@dataclass(frozen=True)
class Key:
    status: str  # mapped | noop | refused | gui
    arg: str  # FLAG, INT, ... : how the option is read from the command line
    note: str  # one line: what it maps to, why it changes nothing, or why it is refused and what to use
    harmless: tuple = ()  # refused keys: values with no effect (sd-scripts' default and its equivalents)


def mapped(arg: str, note: str) -> Key:
    return Key("mapped", arg, note)


def noop(arg: str, note: str) -> Key:
    return Key("noop", arg, note)


def refused(arg: str, note: str, *harmless) -> Key:
    defaults = {FLAG: (False,), STR: (None, ""), LIST: (None, []), FLOATS: (None, [])}.get(arg, (None,))
    return Key("refused", arg, note, defaults + harmless)


def gui(arg: str = STR) -> Key:
    return Key("gui", arg, "written by the kohya_ss GUI; no sd-scripts script reads it (ignored there too)")


# sd-scripts flags of our schema's keys whose command-line kind differs from our schema's type
CLI_KINDS = {"resolution": STR, "text_encoder_lr": FLOATS, "lr_warmup_steps": NUM, "network_args": LIST,
             "optimizer_args": LIST}

# sd-scripts values of our schema's keys read differently (library/sd_flat.py converts them)
SD_MODULES = {"networks.lora_flux": "networks.lora", "networks.lora_sd3": "networks.lora",
              "networks.lora_anima": "networks.lora"}
REFUSED_MODULES = {
    "networks.oft": "sd-scripts' OFT (dim = number of blocks, alpha = constraint) is not offered: use "
                    "network_module = \"lycoris.kohya\" with network_args = [\"algo=oft\"]",
    "networks.dylora": "DyLoRA is not offered: use networks.lora",
    "networks.lora_fa": "LoRA-FA is not offered: use networks.lora",
}

# network_args keys of sd-scripts' and LyCORIS' modules that this trainer does not take: (values with no
# effect, lower-case; None: any value), and the reason a different value is refused
NETWORK_ARGS: dict[str, tuple[tuple | None, str]] = {
    "train_norm": (("false",), "training the norm layers is not offered"),
    "train_t5xxl": (("false",), "lora_flux's LoRA on T5-XXL is not offered (T5 is never trained here): drop it to "
                                "train the FLUX transformer and CLIP-L"),
    "verbose": (None, "prints the adapted layers; no effect on training"),
    "exclude_patterns": ((), "lora_anima's layer patterns are not offered: adapters go into the DiT blocks' "
                             "attention and MLP, lora_anima's default"),
    "include_patterns": ((), "lora_anima's layer patterns are not offered: adapters go into the DiT blocks' "
                             "attention and MLP, lora_anima's default"),
    "network_reg_dims": ((), "per-pattern ranks of lora_anima are not offered: use network_dim"),
    "network_reg_lrs": ((), "per-pattern learning rates of lora_anima are not offered: use unet_lr"),
}
LYCORIS_ALGOS_REFUSED = {"full": "LyCORIS' native fine-tuning: use train_db.py",
                         "ia3": "(IA)^3 is not offered: use algo lora, loha or lokr",
                         "diag-oft": "diag-oft is not offered: use algo oft", "glora": "GLoRA is not offered"}

# sd-scripts dataset-TOML keys the dataset TOML reader does not take: (values with no effect, reason otherwise)
DATASET_KEYS: dict[str, tuple[tuple, str]] = {
    "cache_info": ((None, False, True), "disk caches are checked by their content and settings"),
    "secondary_separator": ((None, ""), "not offered: use caption_separator and keep_tokens_separator"),
    "enable_wildcard": ((None, False), "wildcard captions ({a|b}) are not offered"),
    "face_crop_aug_range": ((None, ""), "face-crop augmentation is not offered: use random_crop"),
    "validation_split": ((None, 0, 0.0), "per dataset: set validation_split in the training config (every subset)"),
    "validation_seed": ((None,), "per dataset: set validation_seed in the training config"),
    "resize_interpolation": ((None, ""), "images are resized with the trainer's fixed interpolation"),
    "network_multiplier": ((None, 1, 1.0), "per-dataset adapter multipliers are not offered"),
    "custom_attributes": ((None, {}), "custom subset attributes are not offered"),
}

# read by sd-scripts only to upload to huggingface_repo_id: with that unset or empty (the kohya_ss GUI writes
# huggingface_repo_id = "" beside repo_type = "model" and the like), nothing is uploaded and they change nothing
UPLOAD_KEYS = ("huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility",
               "save_state_to_huggingface", "async_upload")

# sd-scripts' defaults that differ from ours where relying on them changes results: told at start
DIFFERENT_DEFAULTS = {
    "caption_extension": ".caption",  # ours .txt: what nearly every published dataset uses
    "learning_rate": 2e-6,  # ours 1e-4: a LoRA rate; sd-scripts' default is a full fine-tune rate
}

# sd-scripts' DeepSpeed options: accelerate launch sets them here (library/engines.py reads the launch)
DEEPSPEED_LAUNCH = ("DeepSpeed's setting: given to `accelerate launch --use_deepspeed` here (--zero_stage N, "
                    "--offload_optimizer_device cpu, ...)")

VOCAB: dict[str, Key] = {
    # ---- renamed or converted: implemented ------------------------------------------------------
    "caption_extention": mapped(STR, "sd-scripts' old spelling of caption_extension"),
    "fp8_base_unet": mapped(FLAG, "fp8_base (our fp8_base never touches the text encoders)"),
    "training_shift": mapped(FLOAT, "discrete_flow_shift (SD3)"),
    "use_8bit_adam": mapped(FLAG, "optimizer_type = \"AdamW8bit\""),
    "use_lion_optimizer": mapped(FLAG, "optimizer_type = \"Lion\""),
    "learning_rate_te1": mapped(FLOAT, "learning_rate_te (train_db.py: the first text encoder's rate)"),
    "save_state_on_train_end": mapped(FLAG, "a resumable state beside the last file (save_state at the end)"),
    "save_last_n_epochs_state": mapped(INT, "keep the newest N epoch states (our save_last_n_epochs keeps "
                                            "files and states together: the same N only)"),
    "save_last_n_steps_state": mapped(INT, "keep the newest N step states (our save_last_n_steps keeps "
                                           "files and states together: the same N only)"),
    "dataset_repeats": mapped(INT, "num_repeats of an in_json (fine-tune metadata) dataset; no effect without "
                                   "in_json, as in sd-scripts"),
    "batch_size": noop(INT, "sd-scripts reads batch_size only in a dataset TOML and ignores it in a training TOML "
                            "(train_batch_size applies): set train_batch_size to change the batch"),
    # ---- accepted: no effect on training ---------------------------------------------------------
    "tokenizer_cache_dir": noop(STR, "tokenizers come from model.tokenizer or the local Hugging Face cache"),
    "mem_eff_attn": noop(FLAG, "attention is memory-efficient already (sdpa, or xformers)"),
    "persistent_data_loader_workers": noop(FLAG, "worker lifetime only; batches are the same"),
    "lowram": noop(FLAG, "how sd-scripts loads weights into RAM; loading here is streamed from safetensors"),
    "highvram": noop(FLAG, "a caching speed switch in sd-scripts; caches here are built once either way"),
    "log_tracker_name": noop(STR, "tracker project name: the run is named log_prefix + output_name"),
    "wandb_run_name": noop(STR, "the run is named log_prefix + output_name"),
    "log_tracker_config": noop(STR, "tracker settings file: trackers use their own defaults"),
    "wandb_api_key": noop(STR, "log in with `wandb login` or WANDB_API_KEY"),
    "log_config": noop(FLAG, "the whole config is logged as hyperparameters, and written as <name>-config.toml"),
    "text_encoder_batch_size": noop(INT, "caching speed only"),
    "disable_mmap_load_safetensors": noop(FLAG, "loading speed only"),
    "cache_info": noop(FLAG, "disk caches are checked by their content and settings"),
    "skip_cache_check": noop(FLAG, "disk caches are checked by their content and settings"),
    "skip_latents_validity_check": noop(FLAG, "disk caches are checked by their content and settings"),
    "use_safetensors": noop(FLAG, "files are saved as safetensors (save_model_as)"),
    "support_dreambooth": noop(FLAG, "dataset TOML parsing switch; every subset kind is read"),
    "support_finetuning": noop(FLAG, "dataset TOML parsing switch; every subset kind is read"),
    "support_controlnet": noop(FLAG, "dataset TOML parsing switch; every subset kind is read"),
    "support_dropout": noop(FLAG, "dataset TOML parsing switch; every subset kind is read"),
    "console_log_level": noop(STR, "console logging only"),
    "console_log_file": noop(STR, "console logging only"),
    "console_log_simple": noop(FLAG, "console logging only"),
    "mem_eff_save": noop(FLAG, "saving streams tensors already"),
    "zero_stage": noop(INT, DEEPSPEED_LAUNCH),
    "offload_optimizer_device": noop(STR, DEEPSPEED_LAUNCH),
    "offload_optimizer_nvme_path": noop(STR, DEEPSPEED_LAUNCH),
    "offload_param_device": noop(STR, DEEPSPEED_LAUNCH),
    "offload_param_nvme_path": noop(STR, DEEPSPEED_LAUNCH),
    "zero3_init_flag": noop(FLAG, DEEPSPEED_LAUNCH),
    "zero3_save_16bit_model": noop(FLAG, DEEPSPEED_LAUNCH),
    "fp16_master_weights_and_gradients": noop(FLAG, DEEPSPEED_LAUNCH),
    "t5xxl_device": noop(STR, "T5 visits the training device while captions are encoded"),
    "num_cpu_threads_per_process": noop(INT, "accelerate launch's option, read by no sd-scripts script (a config "
                                             "file's value is ignored there too); give it to accelerate launch"),
    # ---- refused unless at sd-scripts' default ----------------------------------------------------
    "huggingface_repo_id": refused(STR, "uploading to the Hub is not offered: upload the saved file yourself"),
    "huggingface_repo_type": refused(STR, "uploading to the Hub is not offered"),
    "huggingface_path_in_repo": refused(STR, "uploading to the Hub is not offered"),
    "huggingface_token": refused(STR, "uploading to the Hub is not offered"),
    "huggingface_repo_visibility": refused(STR, "uploading to the Hub is not offered"),
    "save_state_to_huggingface": refused(FLAG, "uploading to the Hub is not offered"),
    "resume_from_huggingface": refused(FLAG, "resuming from the Hub is not offered: download the state folder "
                                             "and set resume"),
    "async_upload": refused(FLAG, "uploading to the Hub is not offered"),
    "output_config": refused(FLAG, "the resolved config is written as <output_name>-config.toml at every start"),
    "secondary_separator": refused(STR, "not offered: use caption_separator and keep_tokens_separator"),
    "enable_wildcard": refused(FLAG, "wildcard captions ({a|b}) are not offered"),
    "face_crop_aug_range": refused(STR, "face-crop augmentation is not offered: use random_crop"),
    "debug_dataset": refused(FLAG, "use the dataset check that runs at every start (bad_data)"),
    "resize_interpolation": refused(STR, "images are resized with the trainer's fixed interpolation (area / "
                                         "lanczos); leave it unset"),
    "dataset_class": refused(STR, "custom dataset classes are not offered: use a dataset TOML"),
    "v_pred_like_loss": refused(FLOAT, "not offered: use scale_v_pred_loss_like_noise_pred or min_snr_gamma", 0,
                                0.0),
    "deepspeed": refused(FLAG, "DeepSpeed is chosen with accelerate, not a flag: accelerate launch --use_deepspeed "
                               "--zero_stage N (and --offload_optimizer_device cpu) train_db.py, for full "
                               "fine-tunes; adapters train on several GPUs with DDP (accelerate launch --multi_gpu)"),
    "controlnet_model_name_or_path": refused(STR, "ControlNet training is not offered"),
    "model_type": mapped(STR, "model.family (flux_train_network's flux or chroma)"),
    "save_clip": refused(FLAG, "train_db.py saves the denoiser file only; the text encoders are unchanged"),
    "save_t5xxl": refused(FLAG, "train_db.py saves the denoiser file only; T5 is never trained"),
    "t5xxl_dtype": refused(STR, "use model.t5xxl_precision (auto, fp8, int8, nf4)"),
    "apply_lg_attn_mask": refused(FLAG, "masking CLIP-L/G padding is not offered (apply_t5_attn_mask is)"),
    "clip_l_dropout_rate": refused(FLOAT, "per-encoder caption dropout is not offered: use caption_dropout_rate",
                                   0, 0.0),
    "clip_g_dropout_rate": refused(FLOAT, "per-encoder caption dropout is not offered: use caption_dropout_rate",
                                   0, 0.0),
    "t5_dropout_rate": refused(FLOAT, "per-encoder caption dropout is not offered: use caption_dropout_rate",
                               0, 0.0),
    "pos_emb_random_crop_rate": refused(FLOAT, "SD3 position-embedding crop is not offered", 0, 0.0),
    "enable_scaled_pos_embed": refused(FLAG, "SD3 scaled position embeddings are not offered"),
    "dim_from_weights": mapped(FLAG, "network_dim / network_alpha (and conv_dim / conv_alpha) read from the "
                                     "network_weights file; refused when its layers have different ranks"),
    "base_weights": refused(LIST, "merging other LoRAs into the base is not offered: merge them first"),
    "base_weights_multiplier": refused(FLOATS, "merging other LoRAs into the base is not offered"),
    "split_mode": refused(FLAG, "FLUX split mode is not offered: use blocks_to_swap"),
    "no_token_padding": refused(FLAG, "captions are always padded to the encoder length"),
    "diffusers_xformers": refused(FLAG, "use xformers = true"),
    "block_lr": refused(STR, "per-block learning rates of sdxl_train are not offered in train_db.py"),
    "train_t5xxl": refused(FLAG, "T5 is never trained here"),
    "use_t5xxl_cache_only": refused(FLAG, "use cache_text_encoder_outputs (every encoder's outputs cached)"),
    "learning_rate_te3": refused(FLOAT, "T5 is never trained here"),
    "blockwise_fused_optimizers": refused(FLAG, "use fused_optimizer_groups (N groups stepped in backward) or "
                                                "fused_backward_pass"),
    "num_last_block_to_freeze": refused(INT, "freezing the last blocks is not offered"),
    "double_blocks_to_swap": mapped(INT, "blocks_to_swap = double + single blocks (spread over both kinds; memory "
                                         "only, training unchanged)"),
    "single_blocks_to_swap": mapped(INT, "blocks_to_swap = double + single blocks (see double_blocks_to_swap)"),
    # ---- written by the kohya_ss GUI, read by no sd-scripts script --------------------------------
    "epoch": gui(INT),
    "noise_offset_type": gui(),
    "sdxl": gui(FLAG),
    "lr_restart_cycles": gui(INT),
    "additional_parameters": gui(),
    "attn_mode": gui(),
    "split_attn": gui(FLAG),
    "show_timesteps": gui(),
    "show_timesteps_resolution": gui(),
    "train_inpainting": gui(FLAG),
    "vae_chunk_size": noop(INT, "anima_train_network: the Qwen-Image VAE's memory while caching latents only"),
    "vae_disable_cache": noop(FLAG, "anima_train_network: the Qwen-Image VAE's memory while caching latents only"),
    "llm_adapter_path": mapped(STR, "model.llm_adapter (Anima)"),
    "qwen3": mapped(STR, "model.text_encoder (Anima's Qwen3-0.6B: a file or a transformers folder, whose tokenizer "
                         "is then read too)"),
    "t5_tokenizer_path": mapped(STR, "model.t5_tokenizer (Anima)"),
    "qwen3_max_token_length": refused(INT, "Anima captions are read at 512 Qwen3 tokens (sd-scripts' default, "
                                           "the pipeline's)", 512),
    "t5_max_token_length": refused(INT, "Anima's LLM adapter reads 512 T5 tokens (sd-scripts' default; its output "
                                        "is 512 long in ComfyUI and diffusers)", 512),
    "unsloth_offload_checkpointing": mapped(FLAG, "cpu_offload_checkpointing (anima_train_network: the checkpointed "
                                                  "activations kept in host memory)"),
    "self_attn_lr": refused(FLOAT, "anima_train's per-component learning rates are not offered: one learning_rate"),
    "cross_attn_lr": refused(FLOAT, "anima_train's per-component learning rates are not offered: one learning_rate"),
    "mlp_lr": refused(FLOAT, "anima_train's per-component learning rates are not offered: one learning_rate"),
    "mod_lr": refused(FLOAT, "anima_train's per-component learning rates are not offered: one learning_rate"),
    "llm_adapter_lr": refused(FLOAT, "anima_train's per-component learning rates are not offered: one learning_rate "
                                     "(the LLM adapter trains with the DiT in train_db.py)"),
    "train_blocks": gui(),
}


def status_table() -> list[tuple[str, str, str]]:
    """(key, status, note) for every listed key, sorted by status then key: README's table."""
    order = {"mapped": 0, "noop": 1, "refused": 2, "gui": 3}
    return sorted(((k, v.status, v.note) for k, v in VOCAB.items()), key=lambda r: (order[r[1]], r[0]))


def vocab_markdown() -> str:
    """README's table of sd-scripts options that are not our schema's keys (those are implemented as named)."""
    titles = {"mapped": "implemented (another name or a conversion)", "noop": "accepted, no effect here",
              "refused": "refused unless at sd-scripts' default", "gui": "kohya_ss GUI keys (no sd-scripts script "
                                                                        "reads them)"}
    lines = ["| sd-scripts key | status | what happens |", "|---|---|---|"]
    lines += [f"| `{key}` | {titles[status]} | {note} |" for key, status, note in status_table()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(vocab_markdown())
