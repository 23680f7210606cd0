"""A flat sd-scripts key set (a training TOML's keys, or command-line flags) mapped onto our sections.

Keys of our schema go to their section; the other sd-scripts keys follow library/sd_vocab.py: converted,
accepted with a note, or refused with the reason. Every refusal and every unknown key is named in one error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from library.config import ConfigError, did_you_mean, key_to_section, schema_default
from library.sd_vocab import (DIFFERENT_DEFAULTS, LYCORIS_ALGOS_REFUSED, NETWORK_ARGS, REFUSED_MODULES, SD_MODULES,
                              UPLOAD_KEYS, VOCAB)


@dataclass
class Mapped:
    sections: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one line each, printed at start
    problems: list[str] = field(default_factory=list)
    at_default: list[str] = field(default_factory=list)  # sd-scripts keys given at their no-effect default

    def put(self, key: str, value: Any) -> None:
        self.sections.setdefault(key_to_section()[key], {})[key] = value

    def get(self, key: str, default=None):
        return self.sections.get(key_to_section()[key], {}).get(key, default)


def map_flat(flat: dict, source: str) -> Mapped:
    out = Mapped()
    owner = key_to_section()
    unknown = []
    for key, value in flat.items():
        if key in CONVERTERS:
            continue  # after the plain keys: a conversion may depend on them
        if key in owner and _unset(key, value):
            out.at_default.append(key)  # sample_prompts = "", resume = false: sd-scripts reads them as unset
        elif key in owner:
            out.put(key, _plain_value(key, value))
        elif key in UPLOAD_KEYS and not flat.get("huggingface_repo_id"):
            out.at_default.append(key)  # nothing is uploaded without a repository: no effect in sd-scripts either
        elif key in VOCAB:
            _apply_vocab(out, key, value)
        else:
            unknown.append(key)
    for key, convert in CONVERTERS.items():
        if key in flat and flat[key] is not None:
            convert(out, flat[key], flat)
    _full_fine_tune_text_encoder(out, flat)
    _adafactor_defaults(out)
    if unknown:
        out.problems += [f"unknown key '{k}'{did_you_mean(k)}" for k in unknown]
    if out.problems:
        raise ConfigError(f"{source}: {len(out.problems)} problem(s):\n  " + "\n  ".join(out.problems))
    if out.at_default:
        out.notes.append("sd-scripts keys at their default, no effect here either: " + ", ".join(out.at_default))
    return out


def _full_fine_tune_text_encoder(out: Mapped, flat: dict) -> None:
    """sd-scripts' full fine-tunes train the text encoders only where that family's script does: train_db.py
    (SD1 / SD2) by default; sdxl_train / sd3_train only with train_text_encoder; flux_train never. Without the
    key, a config whose keys show one of the latter (FLUX / SD3 files, cached text outputs, per-encoder rates,
    the GUI's sdxl = true) leaves the text encoders frozen, as that script would."""
    if "train_text_encoder" in flat:
        return
    hints = [k for k in (*FLOW_MODELS, "cache_text_encoder_outputs", "learning_rate_te1", "learning_rate_te2", "sdxl")
             if flat.get(k)]
    if hints:
        out.put("train_text_encoder", False)


def _adafactor_defaults(out: Mapped) -> None:
    """sd-scripts' Adafactor: relative_step is true unless optimizer_args say otherwise, scale_parameter is
    transformers' default (true); values read as Python literals, so the kohya_ss GUI's "relative_step=False,"
    is the tuple (False,), a true value. With relative_step, Adafactor picks its own step size and sd-scripts
    drops learning_rate, unet_lr, text_encoder_lr and lr_scheduler (library/optim.py does the same)."""
    from library.config import optimizer_kwargs

    if str(out.get("optimizer_type", "")).lower() != "adafactor":
        return
    args = list(out.get("optimizer_args") or [])
    given = optimizer_kwargs(args) if all("=" in a for a in args) else {}
    defaults = [f"{k}=True" for k in ("relative_step", "scale_parameter") if k not in given]
    if defaults:
        out.put("optimizer_args", args + defaults)
        out.notes.append(f"Adafactor: {', '.join(defaults)} added to optimizer_args (sd-scripts' defaults)")
    if given.get("relative_step", True) or given.get("warmup_init"):
        out.notes.append("Adafactor with relative_step: it picks its own step size (min(1e-2, 1/sqrt(step)), "
                         "times the weights' RMS with scale_parameter); learning_rate, unet_lr, text_encoder_lr "
                         "and lr_scheduler are not used, as in sd-scripts")


def text_encoder_of_family(cfg, family: str | None) -> str | None:
    """sd-scripts input to train_db.py, once the model's family is known: SDXL / SD3 (sdxl_train / sd3_train)
    train the text encoders only when the config asks, FLUX.1 (flux_train) never. Sets
    cfg.dreambooth.train_text_encoder; returns the line to print where it changed it, else None."""
    db, given = cfg.dreambooth, cfg.sd_scripts_keys
    if given is None or family is None or not db.train_text_encoder:
        return None
    if family == "flux":
        db.train_text_encoder = False
        return ("text encoders frozen: sd-scripts' flux_train never trains them (train_text_encoder is read "
                "by the other scripts only)")
    if family in ("sdxl", "sd3") and "train_text_encoder" not in given:
        db.train_text_encoder = False
        return (f"text encoders frozen: sd-scripts' {family}_train trains them only with train_text_encoder = "
                f"true, which this config leaves unset")
    return None


def network_only_keys(cfg, recipe: str) -> None:
    """sd-scripts input to train_db.py: fp8_base_unet is read by the *_train_network scripts only (the full
    fine-tunes ignore it), so it does not switch fp8_base on here; noted."""
    given = cfg.sd_scripts_keys
    if recipe != "db" or given is None or "fp8_base_unet" not in given or "fp8_base" in given:
        return
    if cfg.train.fp8_base:
        cfg.train.fp8_base = False
        cfg.notes.append("'fp8_base_unet' is ignored, as sd-scripts' full fine-tunes ignore it (only the "
                         "*_train_network scripts read it)")


def default_notes(flat: dict) -> list[str]:
    """Where an sd-scripts config relies on an sd-scripts default that ours does not share."""
    return [f"'{k}' is not set: sd-scripts' default is {v!r}, this trainer's is {schema_default(k)!r}; set it "
            f"to keep sd-scripts' behaviour" for k, v in DIFFERENT_DEFAULTS.items() if k not in flat]


def _plain_value(key: str, value):
    if key == "resolution" and isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)?", value):
        sizes = [int(v) for v in value.split(",")]  # sd-scripts writes "512,768"
        return sizes[0] if len(sizes) == 1 else sizes
    if isinstance(value, str) and _list_key(key):
        return [value] if value.strip() else []  # optimizer_args = "" (sd-scripts: no arguments)
    if isinstance(value, str) and _number_key(key) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?\s*", value,
                                                                   re.I):
        return float(value) if re.search(r"[.e]", value, re.I) else int(value)  # "1e-4": a number in quotes
    return value


def _unset(key: str, value) -> bool:
    """An empty string (or false) for one of our optional string keys (paths, names): sd-scripts tests them as
    `if args.key:`, so they mean unset."""
    import typing

    from library.config import SECTIONS

    hint = typing.get_type_hints(SECTIONS[key_to_section()[key]])[key]
    return (value == "" or value is False) and schema_default(key) is None and hint == typing.Optional[str]


def _list_key(key: str) -> bool:
    """A schema key whose type is a list of strings only."""
    import typing

    from library.config import SECTIONS

    return typing.get_type_hints(SECTIONS[key_to_section()[key]])[key] == list[str]


def _number_key(key: str) -> bool:
    """A schema key whose type is a number (and not also a string)."""
    import typing

    from library.config import SECTIONS

    hint = typing.get_type_hints(SECTIONS[key_to_section()[key]])[key]
    args = set(typing.get_args(hint)) if typing.get_origin(hint) is typing.Union else {hint}
    return bool(args & {int, float}) and str not in args


def _apply_vocab(out: Mapped, key: str, value) -> None:
    entry = VOCAB[key]
    if entry.status == "refused":
        if _harmless(value, entry.harmless):
            out.at_default.append(key)
        else:
            out.problems.append(f"'{key}' = {value!r} is refused: {entry.note}")
    elif entry.status == "noop":
        out.notes.append(f"'{key}' accepted, no effect: {entry.note}")
    elif entry.status == "gui":
        out.notes.append(f"'{key}': {entry.note}")
    else:
        raise AssertionError(f"{key}: a mapped key needs a converter")  # pragma: no cover - table check


def _harmless(value, harmless: tuple) -> bool:
    return any(value == h and type(value) is type(h) or (value is None and h is None)
               or (isinstance(value, (int, float)) and not isinstance(value, bool)
                   and isinstance(h, (int, float)) and not isinstance(h, bool) and value == h)
               for h in harmless)


# ---------------------------------------------------------------------------------------------
# Conversions: (out, value, flat) -> None; they put our keys, or add a problem.
# ---------------------------------------------------------------------------------------------


def _rename(ours: str):
    def convert(out: Mapped, value, flat) -> None:
        if value is False:
            return  # a flag left off
        if flat.get(ours) is False:
            out.put(ours, value)  # fp8_base = false, fp8_base_unet = true: the one switched on
        elif ours in flat and flat[ours] != value:
            out.problems.append(f"'{ours}' and its other name are both set, to different values")
        else:
            out.put(ours, value)
    return convert


def _optimizer_switch(name: str):
    def convert(out: Mapped, value, flat) -> None:
        if value is not True:
            return
        if flat.get("optimizer_type"):
            out.problems.append(f"both use_{'8bit_adam' if name == 'AdamW8bit' else 'lion_optimizer'} and "
                                f"optimizer_type are set (sd-scripts stops here too): keep optimizer_type")
        elif flat.get("use_8bit_adam") is True and flat.get("use_lion_optimizer") is True:
            out.problems.append("both use_8bit_adam and use_lion_optimizer are set: keep one")
        else:
            out.put("optimizer_type", name)
    return convert


def _te1_rate(out: Mapped, value, flat) -> None:
    """sdxl_train / sd3_train: learning_rate_te1 and te2, each defaulting to learning_rate."""
    out.put("learning_rate_te", value)
    if flat.get("learning_rate_te2") is None:
        out.put("learning_rate_te2", flat.get("learning_rate", schema_default("learning_rate")))


def _network_module(out: Mapped, value, flat) -> None:
    if value in REFUSED_MODULES:
        out.problems.append(f"'network_module' = {value!r} is refused: {REFUSED_MODULES[value]}")
    else:
        out.put("network_module", SD_MODULES.get(value, value))


def _text_encoder_lr(out: Mapped, value, flat) -> None:
    """sd-scripts' networks.lora uses the first rate for every text encoder; lora_flux / lora_sd3 one each."""
    value = _plain_value("text_encoder_lr", value)
    if not isinstance(value, list):
        out.put("text_encoder_lr", value)
    elif flat.get("network_module") in SD_MODULES:
        out.put("text_encoder_lr", value or None)
    else:
        out.put("text_encoder_lr", value[0] if value else None)
        if len(set(value)) > 1:
            out.notes.append(f"text_encoder_lr = {value}: sd-scripts' networks.lora trains every text encoder at "
                             f"the first rate, {value[0]}; so does this run")


def _state_keep(files_key: str):
    def convert(out: Mapped, value, flat) -> None:
        if value in (None, 0):
            return
        if not flat.get("save_state") and not flat.get("save_state_on_train_end"):
            out.notes.append(f"'{files_key}_state' accepted, no effect: no states are saved (save_state is off)")
            return
        if flat.get(files_key) == value:
            return  # ours keeps files and states together: the same N
        out.problems.append(f"'{files_key}_state' = {value} differs from '{files_key}' = {flat.get(files_key)}: "
                            f"saved files and states are kept together here; set both to the same N")
    return convert


def _state_on_end(out: Mapped, value, flat) -> None:
    if value is True:
        out.put("save_state", True)
        if flat.get("save_every_n_steps") or flat.get("save_every_n_epochs"):
            out.notes.append("save_state_on_train_end: states are saved with every periodic save too")


FLOW_MODELS = ("ae", "t5xxl", "clip_g")  # keys only FLUX.1 / SD3 configs have


def _max_token_length(out: Mapped, value, flat) -> None:
    """sd-scripts ignores max_token_length for FLUX.1 / SD3 (t5xxl_max_token_length applies there)."""
    if any(flat.get(k) for k in FLOW_MODELS) or flat.get("network_module") in SD_MODULES:
        out.notes.append(f"'max_token_length' = {value} accepted, no effect: sd-scripts ignores it for FLUX.1 / SD3 "
                         f"(t5xxl_max_token_length applies)")
    else:
        out.put("max_token_length", value)


def _network_args(out: Mapped, value, flat) -> None:
    """sd-scripts / LyCORIS network_args this trainer does not take: harmless values dropped with a note, others
    refused; the rest go on to [network] (networks/settings.py reads them)."""
    kept = []
    for arg in value if isinstance(value, list) else [value] if str(value).strip() else []:
        key, _, text = str(arg).partition("=")
        key, text = key.strip(), text.strip()
        if key == "algo" and text.lower() in LYCORIS_ALGOS_REFUSED:
            out.problems.append(f"'algo' = {text!r} is refused (network_args): {LYCORIS_ALGOS_REFUSED[text.lower()]}")
        elif key not in NETWORK_ARGS:
            kept.append(arg)
        elif NETWORK_ARGS[key][0] is None:
            out.notes.append(f"network_args '{key}' accepted, no effect: {NETWORK_ARGS[key][1]}")
        elif text.lower() in NETWORK_ARGS[key][0]:
            out.at_default.append(f"network_args {key}={text}")
        else:
            out.problems.append(f"'{key}' = {text!r} is refused (network_args): {NETWORK_ARGS[key][1]}")
    out.put("network_args", kept)


def _dataset_repeats(out: Mapped, value, flat) -> None:
    """sd-scripts reads dataset_repeats for in_json (fine-tune) datasets only."""
    if flat.get("in_json"):
        out.put("num_repeats", value)
    else:
        out.notes.append("'dataset_repeats' accepted, no effect: sd-scripts reads it with in_json only")


def _dim_from_weights(out: Mapped, value, flat) -> None:
    """sd-scripts' dim_from_weights: the ranks and alphas of the network_weights file (kohya LoRA / LoCon)."""
    if value is not True:
        return
    path = flat.get("network_weights")
    try:
        found = _file_ranks(path)
    except (OSError, ValueError, TypeError) as e:
        out.problems.append(f"'dim_from_weights' needs network_weights naming a kohya LoRA file: {path!r} ({e})")
        return
    for kind, (dims, alphas) in found.items():
        if len(dims) > 1 or len(alphas) > 1:
            out.problems.append(f"'dim_from_weights' = True is refused: the file's {kind} layers have different ranks "
                                f"or alphas ({sorted(dims)}, {sorted(alphas)}); one rank per kind (or block_dims) is "
                                f"offered: set network_dim and network_alpha")
            return
    if "linear" in found:
        out.put("network_dim", next(iter(found["linear"][0])))
        out.put("network_alpha", next(iter(found["linear"][1])))
    if "conv" in found:
        out.put("conv_dim", next(iter(found["conv"][0])))
        out.put("conv_alpha", next(iter(found["conv"][1])))
    out.notes.append(f"dim_from_weights: {', '.join(f'{k} rank {next(iter(d))}, alpha {next(iter(a)):g}' for k, (d, a) in found.items())} "
                     f"from {path}")


def _file_ranks(path) -> dict[str, tuple[set, set]]:
    """{"linear" | "conv": ({ranks}, {alphas})} of a kohya LoRA file, from its tensor shapes and alpha values."""
    from safetensors import safe_open

    found: dict[str, tuple[set, set]] = {}
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        downs = [k for k in keys if k.endswith(".lora_down.weight")]
        if not downs:
            raise ValueError("no lora_down weights (not a kohya LoRA / LoCon file)")
        for key in downs:
            shape = f.get_slice(key).get_shape()
            kind = "conv" if len(shape) == 4 and shape[2] * shape[3] > 1 else "linear"
            module = key[: -len(".lora_down.weight")]
            alpha = float(f.get_tensor(f"{module}.alpha")) if f"{module}.alpha" in keys else float(shape[0])
            dims, alphas = found.setdefault(kind, (set(), set()))
            dims.add(int(shape[0]))
            alphas.add(alpha)
    return found


def _split_block_swap(out: Mapped, value, flat) -> None:
    """sd-scripts' earlier FLUX.1 block swap, double_blocks_to_swap D and single_blocks_to_swap S: here
    blocks_to_swap = D + S, spread over both kinds (which blocks swap changes memory and speed only, never the
    training); a blocks_to_swap of its own wins, as in sd-scripts."""
    double, single = flat.get("double_blocks_to_swap") or 0, flat.get("single_blocks_to_swap") or 0
    if not (double or single) or flat.get("blocks_to_swap") or out.get("blocks_to_swap"):
        return
    out.put("blocks_to_swap", double + single)
    out.notes.append(f"double_blocks_to_swap {double} + single_blocks_to_swap {single}: blocks_to_swap = "
                     f"{double + single} (spread over both kinds of block)")


SD_SAMPLERS = {"dpm_2": "k_dpm_2", "dpm_2_a": "k_dpm_2_a"}  # sd-scripts: the same schedulers as k_dpm_2 / k_dpm_2_a
REFUSED_VALUES = {
    ("save_model_as", "ckpt"): "use safetensors (the same weights in one safe file every UI loads)",
    ("save_model_as", "diffusers_safetensors"): "use diffusers (a diffusers folder, saved as safetensors)",
    ("log_with", "all"): "choose tensorboard or wandb",
}


def _sampler(out: Mapped, value, flat) -> None:
    out.put("sample_sampler", SD_SAMPLERS.get(value, value))


def _refused_values(key: str):
    def convert(out: Mapped, value, flat) -> None:
        if (key, value) in REFUSED_VALUES:
            out.problems.append(f"'{key}' = {value!r} is refused: {REFUSED_VALUES[key, value]}")
        else:
            out.put(key, value)
    return convert


CONVERTERS = {
    "sample_sampler": _sampler,
    "save_model_as": _refused_values("save_model_as"),
    "log_with": _refused_values("log_with"),
    "dim_from_weights": _dim_from_weights,
    "dataset_repeats": _dataset_repeats,
    "network_args": _network_args,
    "max_token_length": _max_token_length,
    "caption_extention": _rename("caption_extension"),
    "fp8_base_unet": _rename("fp8_base"),
    "double_blocks_to_swap": _split_block_swap,
    "single_blocks_to_swap": _split_block_swap,
    "training_shift": _rename("discrete_flow_shift"),
    "model_type": _rename("family"),  # flux_train_network: flux | chroma
    "qwen3": _rename("text_encoder"),  # anima_train_network
    "llm_adapter_path": _rename("llm_adapter"),
    "t5_tokenizer_path": _rename("t5_tokenizer"),
    "unsloth_offload_checkpointing": _rename("cpu_offload_checkpointing"),
    "use_8bit_adam": _optimizer_switch("AdamW8bit"),
    "use_lion_optimizer": _optimizer_switch("Lion"),
    "learning_rate_te1": _te1_rate,
    "network_module": _network_module,
    "text_encoder_lr": _text_encoder_lr,
    "save_last_n_epochs_state": _state_keep("save_last_n_epochs"),
    "save_last_n_steps_state": _state_keep("save_last_n_steps"),
    "save_state_on_train_end": _state_on_end,
}
