"""The checks of a loaded config (library/config.py) before any model loads: the paths it names exist and
earlier outputs are not overwritten; no impossible combination of keys; keys that only one recipe
understands (check_recipe). Each problem names the key; all of a config's problems are raised at once.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from library.config import SECTIONS, Config, ConfigError, _did_you_mean

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_paths(cfg: Config) -> None:
    """What the config names on this machine: its files and folders, xformers when asked for."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            kind, value = f.metadata.get("path"), getattr(section, f.name)
            if kind and value is not None:
                _check_path(f"{name}.{f.name}", value, kind, cfg.source)
    if cfg.train.xformers:  # what is installed here is checked with the files (a plan needs neither)
        import importlib.util
        if importlib.util.find_spec("xformers") is None:
            raise ConfigError(f"{cfg.source}: 'train.xformers' = true but xformers is not installed "
                              f"(pip install xformers, or use the default sdpa)")
    model = cfg.model.pretrained_model_name_or_path
    if not os.path.exists(model) and not HUB_ID.match(model):
        raise ConfigError(f"{cfg.source}: 'model.pretrained_model_name_or_path': no such file or folder: {model}")
    out, name = Path(cfg.train.output_dir), cfg.train.output_name
    earlier = sorted([*out.glob(f"{glob_escape(name)}.safetensors"), *out.glob(f"{glob_escape(name)}-*.safetensors"),
                      *[p for p in out.glob(glob_escape(name)) if p.is_dir()]])
    if cfg.save.resume and cfg.save.resume != "latest" and not Path(cfg.save.resume, "state.json").is_file():
        raise ConfigError(f"{cfg.source}: 'save.resume': {cfg.save.resume} is not a saved state folder "
                          f"(no state.json in it)")
    if earlier and not cfg.save.overwrite and not cfg.save.resume:  # resuming continues the same run
        raise ConfigError(f"{cfg.source}: {earlier[0]} exists from an earlier run and would be overwritten; "
                          f"choose another 'train.output_name' or output_dir, or set 'save.overwrite' = true")


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def _check_path(key: str, value: str, kind: str, source: str) -> None:
    p = Path(value)
    ok = {"file": p.is_file(), "dir": p.is_dir(), "exists": p.exists()}[kind]
    if not ok:
        what = {"file": "file", "dir": "folder", "exists": "file or folder"}[kind]
        raise ConfigError(f"{source}: '{key}': no such {what}: {value}")


def check_combinations(cfg: Config) -> None:
    t, n, src = cfg.train, cfg.network, cfg.source
    problems = []
    if t.full_fp16 and t.mixed_precision != "fp16":
        problems.append("'train.full_fp16' needs 'train.mixed_precision' = \"fp16\"")
    if t.full_bf16 and t.mixed_precision != "bf16":
        problems.append("'train.full_bf16' needs 'train.mixed_precision' = \"bf16\"")
    if t.fp8_base and t.mixed_precision not in ("bf16", "fp16"):
        problems.append("'train.fp8_base' computes in the autocast dtype: set 'train.mixed_precision' = \"bf16\" "
                        "(or \"fp16\")")
    if t.blocks_to_swap < 0:
        problems.append(f"'train.blocks_to_swap' must be 0 or more, got {t.blocks_to_swap}")
    if t.blocks_to_swap and not t.gradient_checkpointing:
        problems.append("'train.blocks_to_swap' needs 'train.gradient_checkpointing' = true: without it autograd "
                        "keeps every block's weights on the GPU for backward, so none could leave")
    if t.cpu_offload_checkpointing and not t.gradient_checkpointing:
        problems.append("'train.cpu_offload_checkpointing' offloads the checkpointed inputs: set "
                        "'train.gradient_checkpointing' = true")
    if n.network_train_unet_only and n.network_train_text_encoder_only:
        problems.append("'network.network_train_unet_only' and 'network.network_train_text_encoder_only' "
                        "cannot both be true")
    if cfg.dataset.train_data_dir is None and cfg.dataset.dataset_config is None:
        problems.append("'dataset.train_data_dir' or 'dataset.dataset_config' is required")
    res = cfg.dataset.resolution
    sizes = res if isinstance(res, list) else [res]
    if len(sizes) not in (1, 2) or any(s < 8 or s % 8 for s in sizes):
        problems.append(f"'dataset.resolution' = {res!r}: one or two sizes, each a multiple of 8")
    for key, value in [("network.network_dim", n.network_dim), ("dataset.train_batch_size",
                       cfg.dataset.train_batch_size), ("train.max_train_steps", t.max_train_steps),
                       ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                       ("train.clip_skip", cfg.model.clip_skip)]:
        if value < 1:
            problems.append(f"'{key}' must be at least 1, got {value}")
    for arg in n.network_args + cfg.optimizer.optimizer_args:
        if "=" not in arg:
            problems.append(f"argument {arg!r} must be written key=value")
    problems += _optimizer_problems(cfg)
    if cfg.sample.sample_prompts and Path(cfg.sample.sample_prompts).is_file():
        from library.sampling import PromptFileError, read_prompt_file

        try:
            read_prompt_file(cfg.sample.sample_prompts)
        except (PromptFileError, ValueError) as e:  # ValueError: malformed TOML / JSON
            problems.append(f"'sample.sample_prompts': {e}")
    lo = cfg.loss
    if lo.max_timestep is not None and not (lo.min_timestep < lo.max_timestep <= 1000) or lo.min_timestep < 0:
        problems.append(f"'loss.min_timestep' = {lo.min_timestep} and 'loss.max_timestep' = {lo.max_timestep}: "
                        f"need 0 <= min < max <= 1000")
    from networks.settings import check_network_section

    problems += check_network_section(n, cfg.save.save_format)
    if problems:
        raise ConfigError(f"{src}:\n  " + "\n  ".join(problems))


OPTIMIZERS = ("adamw", "adamw8bit", "pagedadamw8bit", "lion", "lion8bit", "pagedlion8bit", "sgdnesterov",
              "adafactor", "prodigy")
# optimizers whose update of one tensor depends only on that tensor's gradient and state, so stepping each
# tensor in its own gradient hook is the same update (Prodigy's step size is estimated over all tensors: no)
PER_TENSOR_OPTIMIZERS = ("adamw", "adamw8bit", "pagedadamw8bit", "lion", "lion8bit", "pagedlion8bit",
                         "sgdnesterov", "adafactor")


def _optimizer_problems(cfg: Config) -> list[str]:
    o, t = cfg.optimizer, cfg.train
    name = o.optimizer_type.lower()
    problems = []
    if name not in OPTIMIZERS and "." not in name:
        problems.append(f"'optimizer.optimizer_type' = {o.optimizer_type!r} is not one of "
                        f"{', '.join(OPTIMIZERS)} nor a dotted class path{_did_you_mean(name, OPTIMIZERS)}")
    fused = o.fused_backward_pass or o.fused_optimizer_groups
    if o.fused_backward_pass and o.fused_optimizer_groups:
        problems.append("'optimizer.fused_backward_pass' and 'optimizer.fused_optimizer_groups': choose one")
    if o.fused_optimizer_groups is not None and o.fused_optimizer_groups < 1:
        problems.append("'optimizer.fused_optimizer_groups' must be at least 1")
    if fused and t.gradient_accumulation_steps > 1:
        problems.append("fused backward pass frees each gradient as soon as it is used, so it cannot accumulate "
                        "gradients: set 'train.gradient_accumulation_steps' = 1")
    if fused and t.mixed_precision == "fp16" and not t.full_fp16:
        problems.append("fused backward pass cannot unscale fp16 loss-scaled gradients one tensor at a time: "
                        "use mixed_precision = \"bf16\"")
    if fused and name not in PER_TENSOR_OPTIMIZERS:
        problems.append(f"fused backward pass needs an optimizer whose update is per tensor "
                        f"({', '.join(PER_TENSOR_OPTIMIZERS)}); {o.optimizer_type!r} is not")
    return problems


def check_recipe(cfg: Config, recipe: str) -> None:
    """Keys that only one recipe understands."""
    problems = []
    caching = cfg.train.cache_text_encoder_outputs or cfg.train.cache_text_encoder_outputs_to_disk
    if recipe == "network" and caching and not cfg.network.network_train_unet_only:
        problems.append("'train.cache_text_encoder_outputs' needs a frozen text encoder: "
                        "set 'network.network_train_unet_only' = true")
    if recipe == "db" and caching and cfg.dreambooth.train_text_encoder:
        problems.append("'train.cache_text_encoder_outputs' needs a frozen text encoder: "
                        "set 'dreambooth.train_text_encoder' = false")
    if recipe == "db" and cfg.dreambooth.class_data_dir and (cfg.dataset.reg_data_dir or cfg.dataset.dataset_config):
        problems.append("'dreambooth.class_data_dir' is the regularization folder: leave 'dataset.reg_data_dir' "
                        "unset (with a dataset_config, add the class folder there as a subset with is_reg = true)")
    if recipe == "db" and cfg.dreambooth.num_class_images and not (cfg.dreambooth.class_data_dir
                                                                    and cfg.dreambooth.class_prompt):
        problems.append("'dreambooth.num_class_images' needs 'dreambooth.class_data_dir' and "
                        "'dreambooth.class_prompt' (where to put class images, and what they show)")
    if recipe == "db" and cfg.train.fp8_base:
        problems.append("'train.fp8_base' stores frozen weights in float8; train_db.py trains the denoiser's weights, "
                        "which must stay bf16/fp32 to take updates: use full_bf16 (with fused_backward_pass) and "
                        "blocks_to_swap instead")
    if recipe == "db" and cfg.train.blocks_to_swap and not cfg.optimizer.fused_backward_pass:
        problems.append("'train.blocks_to_swap' in train_db.py needs 'optimizer.fused_backward_pass' = true: each "
                        "swapped weight is stepped inside backward while its block is on the GPU (an optimizer "
                        "stepping after backward, or per group, would find it back in CPU memory)")
    if recipe == "network":
        if cfg.optimizer.fused_backward_pass or cfg.optimizer.fused_optimizer_groups:
            problems.append("fused backward pass is for full fine-tuning (train_db.py); adapter gradients are "
                            "small: remove 'optimizer.fused_backward_pass' / 'fused_optimizer_groups'")
        if cfg.save.save_model_as != "safetensors":
            problems.append("'save.save_model_as' = \"diffusers\" is for train_db.py; adapters are saved as "
                            "kohya .safetensors")
    if problems:
        raise ConfigError(f"{cfg.source}:\n  " + "\n  ".join(problems))
