"""The checks of a loaded config (library/config.py) before any model loads: the paths it names exist and
earlier outputs are not overwritten; no impossible combination of keys; keys that only one recipe
understands (check_recipe). Each problem names the key; all of a config's problems are raised at once.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from library.config import SECTIONS, Config, ConfigError, _did_you_mean, optimizer_kwargs

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _xformers_problem() -> str | None:
    """Why xformers cannot run here: not installed, or its import fails (a build for another PyTorch or CUDA,
    the usual case after upgrading torch), found by importing xformers.ops as the attention processor will."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install xformers)"
    try:
        importlib.import_module("xformers.ops")
    except Exception as e:  # noqa: BLE001  (whatever its import raises, the run could not use it)
        said = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"xformers does not import ({said[:160]}): install the build made for this PyTorch"
    return None


def check_paths(cfg: Config) -> None:
    """What the config names on this machine: its files and folders, xformers when asked for."""
    for name in SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            kind, value = f.metadata.get("path"), getattr(section, f.name)
            if kind and value is not None:
                _check_path(f"{name}.{f.name}", value, kind, cfg.source)
    if cfg.train.xformers:  # what is installed here is checked with the files (a plan needs neither)
        problem = _xformers_problem()
        if problem:
            raise ConfigError(f"{cfg.source}: 'train.xformers' = true but {problem}; or remove it (the default, "
                              f"PyTorch SDPA, is as fast on current GPUs)")
    model = cfg.model.pretrained_model_name_or_path
    if not os.path.exists(model) and not HUB_ID.match(model):
        raise ConfigError(f"{cfg.source}: 'model.pretrained_model_name_or_path': no such file or folder: {model}")
    if cfg.save.resume:
        _check_resume(cfg)
    from library.outputs import check_outputs

    cfg.run_id = check_outputs(cfg)  # nothing another run left is overwritten; the run's id


def _check_resume(cfg: Config) -> None:
    """The state to resume is whole and was saved with this config (the seed drawn then counts as set)."""
    from library.saved_state import check_resumable, find_state, read_state_info

    try:
        folder = find_state(cfg.save.resume, Path(cfg.train.output_dir), say=lambda _: None)
        config = cfg.to_toml_dict()
        if cfg.train.seed is None:
            config["train"]["seed"] = read_state_info(folder)["config"].get("train", {}).get("seed")
        check_resumable(folder, config)
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: 'save.resume' = {cfg.save.resume!r}: {e}") from None


def joined(source: str, problems: list[str]) -> str:
    """One problem: one line. Several: a line that counts them, each indented below it."""
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems:\n  " + "\n  ".join(problems)


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
    problems = _base_precision_problems(cfg)
    if t.full_fp16 and t.mixed_precision != "fp16":
        problems.append("'train.full_fp16' needs 'train.mixed_precision' = \"fp16\"")
    if t.full_bf16 and t.mixed_precision != "bf16":
        problems.append("'train.full_bf16' needs 'train.mixed_precision' = \"bf16\"")
    if t.fp8_base and t.mixed_precision not in ("bf16", "fp16"):
        problems.append("'train.fp8_base' computes in the autocast dtype: set 'train.mixed_precision' = \"bf16\" "
                        "(or \"fp16\")")
    if t.blocks_to_swap < 0:
        problems.append(f"'train.blocks_to_swap' must be 0 or more, got {t.blocks_to_swap}")
    if not 0 <= t.validation_split < 1:
        problems.append(f"'train.validation_split' is the fraction of images held out: from 0 up to (not "
                        f"including) 1, got {t.validation_split}")
    if cfg.loss.adaptive_noise_scale and not cfg.loss.noise_offset:
        problems.append("'loss.adaptive_noise_scale' adds to noise_offset: set 'loss.noise_offset' too (as "
                        "sd-scripts requires)")
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
                       ("train.clip_skip", cfg.model.clip_skip),
                       ("dreambooth.ema_update_every", cfg.dreambooth.ema_update_every)]:
        if value < 1:
            problems.append(f"'{key}' must be at least 1, got {value}")
    for arg in n.network_args:
        if "=" not in arg:
            problems.append(f"argument {arg!r} must be written key=value")
    if (t.initial_step or (t.initial_epoch or 1) > 1) and not t.skip_until_initial_step:
        problems.append("'train.initial_step' / 'initial_epoch' without skip_until_initial_step only renumber epochs "
                        "in sd-scripts (training starts at the first batch either way): set "
                        "'train.skip_until_initial_step' = true to start there, or drop them")
    if (t.initial_step or (t.initial_epoch or 1) > 1) and cfg.save.resume:
        problems.append("'train.initial_step' / 'initial_epoch' with 'save.resume': the saved state's step is "
                        "where a resumed run goes on here; drop one")
    m = cfg.model
    if m.weighted_captions and (m.family in ("flux", "sd3", "chroma") or m.t5xxl or m.ae or m.clip_g):
        problems.append("'model.weighted_captions' weights CLIP tokens of SD1 / SD2 / SDXL captions; sd-scripts' "
                        "FLUX.1 / SD3 scripts do not take it either: turn it off")
    problems += _number_problems(cfg)
    for key in ("optimizer_args", "lr_scheduler_args"):
        args = getattr(cfg.optimizer, key)
        problems += [f"argument {a!r} of 'optimizer.{key}' must be written key=value" for a in args if "=" not in a]
        try:
            optimizer_kwargs([a for a in args if "=" in a], key)
        except ConfigError as e:
            problems.append(str(e))
    if cfg.optimizer.lr_scheduler_type and cfg.optimizer.lr_warmup_steps:
        problems.append("'optimizer.lr_scheduler_type' classes have no warmup (sd-scripts stops here too): "
                        "set 'optimizer.lr_warmup_steps' = 0")
    problems += _optimizer_problems(cfg)
    if cfg.sample.sample_prompts and Path(cfg.sample.sample_prompts).is_file():
        from library.prompts import PromptFileError, read_prompt_file

        try:
            read_prompt_file(cfg.sample.sample_prompts)
        except PromptFileError as e:
            problems.append(f"'sample.sample_prompts': {e}")
    lo = cfg.loss
    if lo.max_timestep is not None and not (lo.min_timestep < lo.max_timestep <= 1000) or lo.min_timestep < 0:
        problems.append(f"'loss.min_timestep' = {lo.min_timestep} and 'loss.max_timestep' = {lo.max_timestep}: "
                        f"need 0 <= min < max <= 1000")
    from networks.settings import check_network_section

    problems += check_network_section(n, cfg.save.save_format)
    if problems:
        raise ConfigError(joined(src, problems))


def _base_precision_problems(cfg: Config) -> list[str]:
    """model.base_model_precision: a peer's spelling read as ours (recorded so), and what it cannot go with."""
    from library.config import BASE_MODEL_PRECISIONS, TEXT_ENCODER_PRECISIONS

    m, t = cfg.model, cfg.train
    m.t5xxl_precision = TEXT_ENCODER_PRECISIONS[m.t5xxl_precision.lower()]
    m.base_model_precision = BASE_MODEL_PRECISIONS[m.base_model_precision.lower()]
    if m.base_model_precision == "no_change":
        return []
    key, problems = f"'model.base_model_precision' = \"{m.base_model_precision}\"", []
    if t.fp8_base:
        problems.append(f"{key} and 'train.fp8_base' both set how the frozen denoiser is stored: choose one")
    algo = _adapter_algo(cfg.network)
    if algo in QUANTIZED_BASE_REFUSED[m.base_model_precision]:
        problems.append(f"{key} with algo = \"{algo}\": that adapter reads the base layer's weight, which is "
                        f"quantized here; use lora or locon (QLoRA)"
                        + (" (or loha / lokr with int8)" if m.base_model_precision == "nf4" else ""))
    return problems


def _adapter_algo(n) -> str | None:
    """The adapter algorithm [network] asks for (algo, or algo= / dora_wd= in network_args), lower-case."""
    args = {a.split("=", 1)[0].strip().lower(): a.split("=", 1)[1].strip().lower() for a in n.network_args if "=" in a}
    if n.dora_wd or args.get("dora_wd") in ("true", "1"):
        return "dora"
    return (n.algo or args.get("algo") or "").lower() or None


# adapters that read the base layer's weight values (DoRA's column norms, OFT's rotated weight) or shape (peft's
# LoHa / LoKr: nf4 packs two weights a byte, int8 keeps the shape) themselves
QUANTIZED_BASE_REFUSED = {"int8": ("dora", "oft", "boft"), "nf4": ("dora", "oft", "boft", "loha", "lokr")}


def _number_problems(cfg: Config) -> list[str]:
    """Values a type check lets through that would train wrongly or crash later: negative or NaN rates, a seed
    numpy cannot take, zero epochs, negative alphas, a warmup as long as the run."""
    import math

    o, t, n = cfg.optimizer, cfg.train, cfg.network
    problems = []
    rates = [("optimizer.learning_rate", o.learning_rate), ("network.unet_lr", n.unet_lr),
             ("network.text_encoder_lr", n.text_encoder_lr), ("dreambooth.learning_rate_te",
                                                                cfg.dreambooth.learning_rate_te),
             ("optimizer.max_grad_norm", o.max_grad_norm)]
    for key, value in rates:
        if isinstance(value, (int, float)) and not (math.isfinite(value) and value >= 0):
            problems.append(f"'{key}' must be a finite number, 0 or more, got {value!r}")
    if t.seed is not None and not 0 <= t.seed < 2**32:
        problems.append(f"'train.seed' must be from 0 to {2**32 - 1} (numpy's range), got {t.seed}")
    if t.max_train_epochs is not None and t.max_train_epochs < 1:
        problems.append(f"'train.max_train_epochs' must be at least 1 (or unset: max_train_steps counts), "
                        f"got {t.max_train_epochs}")
    for key, value in [("network.network_alpha", n.network_alpha), ("network.conv_alpha", n.conv_alpha)]:
        if value is not None and not (math.isfinite(value) and value >= 0):
            problems.append(f"'{key}' must be 0 or more (0 means alpha = dim, as in sd-scripts), got {value!r}")
    warmup = o.lr_warmup_steps
    if warmup < 0 or isinstance(warmup, float) and warmup >= 1:
        problems.append(f"'optimizer.lr_warmup_steps' = {warmup!r}: a step count, or a fraction below 1 of the run")
    elif isinstance(warmup, int) and t.max_train_epochs is None and warmup >= t.max_train_steps:
        problems.append(warmup_too_long(warmup, t.max_train_steps))
    return problems + _schedule_problems(o, t)


def _schedule_problems(o, t) -> list[str]:
    """The values of lr_scheduler's own arguments; each is ignored by the schedules that do not read it, as in
    sd-scripts."""
    problems, ratio = [], o.lr_scheduler_min_lr_ratio
    if ratio is not None and not 0 <= ratio <= 1:
        problems.append(f"'optimizer.lr_scheduler_min_lr_ratio' is the lowest rate as a fraction of the base rate: "
                        f"from 0 to 1, got {ratio!r}")
    if o.lr_scheduler == "cosine_with_min_lr" and ratio is None and not o.lr_scheduler_type:
        problems.append("'optimizer.lr_scheduler' = \"cosine_with_min_lr\" needs "
                        "'optimizer.lr_scheduler_min_lr_ratio' (sd-scripts stops too): e.g. 0.1")
    decay = o.lr_decay_steps
    if decay < 0 or isinstance(decay, float) and decay >= 1:
        problems.append(f"'optimizer.lr_decay_steps' = {decay!r}: a step count, or a fraction below 1 of the run")
    elif o.lr_scheduler == "warmup_stable_decay" and t.max_train_epochs is None:
        steps = [int(v * t.max_train_steps) if isinstance(v, float) else v for v in (o.lr_warmup_steps, decay)]
        if sum(steps) > t.max_train_steps:
            problems.append(f"'optimizer.lr_decay_steps' ({steps[1]}) and 'optimizer.lr_warmup_steps' ({steps[0]}) "
                            f"are longer than the run ({t.max_train_steps} steps): shorten one")
    if o.lr_scheduler_timescale is not None and o.lr_scheduler_timescale < 1:
        problems.append(f"'optimizer.lr_scheduler_timescale' must be at least 1, got {o.lr_scheduler_timescale}")
    if o.lr_scheduler == "piecewise_constant" and not o.lr_scheduler_type and not any(
            a.split("=", 1)[0].strip() == "step_rules" for a in o.lr_scheduler_args):
        problems.append("'optimizer.lr_scheduler' = \"piecewise_constant\" needs its rules in "
                        "'optimizer.lr_scheduler_args', e.g. [\"step_rules='1:10,0.1'\"] (as in sd-scripts)")
    return problems


def warmup_too_long(warmup: int, steps: int) -> str:
    return (f"'optimizer.lr_warmup_steps' = {warmup} is as long as the whole run ({steps} steps): the learning "
            f"rate would never reach 'optimizer.learning_rate'; warm up for fewer steps (or a fraction: 0.1)")


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
    if o.offload_optimizer_state and not fused:
        problems.append("'optimizer.offload_optimizer_state' moves each chunk's state to the GPU for its step inside "
                        "backward: set 'optimizer.fused_backward_pass' = true (or 'fused_optimizer_groups')")
    if fused and t.gradient_accumulation_steps > 1:
        problems.append("fused backward pass frees each gradient as soon as it is used, so it cannot accumulate "
                        "gradients: set 'train.gradient_accumulation_steps' = 1")
    if fused and t.mixed_precision == "fp16" and not t.full_fp16:
        problems.append("fused backward pass cannot unscale fp16 loss-scaled gradients one tensor at a time: "
                        "use mixed_precision = \"bf16\"")
    if fused and name not in PER_TENSOR_OPTIMIZERS:
        problems.append(f"fused backward pass needs an optimizer whose update is per tensor "
                        f"({', '.join(PER_TENSOR_OPTIMIZERS)}); {o.optimizer_type!r} is not")
    if o.optimizer_args and not problems and all("=" in a for a in o.optimizer_args):
        from library.optim import optimizer_args_problem  # imports torch: only when there are arguments

        problem = optimizer_args_problem(o.optimizer_type, o.learning_rate, o.optimizer_args)
        if problem:
            problems.append(f"'optimizer.optimizer_args': {problem}")
    return problems


def check_recipe(cfg: Config, recipe: str) -> None:
    """Keys that only one recipe understands."""
    from library.sd_flat import network_only_keys  # sd-scripts' reading of them

    network_only_keys(cfg, recipe)
    from library.engines import engine_problems

    problems = engine_problems(cfg, recipe)  # what the engine `accelerate launch` set up cannot run
    caching = cfg.train.cache_text_encoder_outputs or cfg.train.cache_text_encoder_outputs_to_disk
    if recipe == "network" and caching and not cfg.network.network_train_unet_only and cfg.model.family in ("sd1",
                                                                                                          "sdxl"):
        problems.append("'train.cache_text_encoder_outputs' needs a frozen text encoder (only FLUX.1 / SD3 cache "
                        "T5 while the CLIPs train): set 'network.network_train_unet_only' = true")
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
    if recipe == "db" and cfg.train.validation_split:
        problems.append("'train.validation_split' is read by train_network.py; train_db.py has no validation loss "
                        "yet: leave it 0")
    if recipe == "db" and cfg.model.base_model_precision != "no_change":
        problems.append(f"'model.base_model_precision' = \"{cfg.model.base_model_precision}\" stores the frozen base "
                        f"quantized, for adapters (train_network.py); train_db.py trains the base's own weights, "
                        f"which cannot take updates in int8 / nf4: leave it \"no_change\"")
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
        raise ConfigError(joined(cfg.source, problems))
