"""Published sd-scripts configs (tests/sdscripts_corpus: training TOMLs, dataset TOMLs, command lines, each with
its source) load unchanged: every one is accepted, or stopped only by keys refused with a reason. A sample
trains two steps on the tiny models, and for some the resolved values are those sd-scripts would use."""
from __future__ import annotations

import re
import shlex
from collections import Counter
from pathlib import Path

import pytest

from library.config import ConfigError
from library.config_files import load_config
from library.config_checks import check_recipe
from library.sd_args import parse

CORPUS = Path(__file__).parent / "sdscripts_corpus"
TRAINING = sorted((CORPUS / "training").glob("*.toml"))
DATASETS = sorted((CORPUS / "dataset").glob("*.toml"))
COMMANDS = sorted((CORPUS / "command_lines").glob("*.txt"))
REFUSED = re.compile(r"^'(\w+)' = .* is refused( \(network_args\))?: ")

# What stops corpus files today: refused key -> number of corpus files (training TOMLs and command lines) it
# stops. A key implemented later leaves this table (and the files it stopped then load).
EXPECTED_REFUSALS: dict[str, int] = {
    "algo": 1,  # LyCORIS algo=full (native fine-tuning)
    "train_norm": 1,  # LyCORIS train_norm=True
    "train_t5xxl": 3,  # lora_flux network_args train_t5xxl=True (G.O.D's FLUX configs): T5 is never trained here
    "blocks_to_swap": 2,  # sd3_train / flux_train with block swap but no fused backward pass
}
# sd-scripts itself rejects these command lines: the error must name the problem
# dataset TOMLs stopped today, and by which keys: none
EXPECTED_DATASET_REFUSALS: dict[str, list[str]] = {}
EXPECTED_ERRORS = {"sd_scripts_doc_sdxl": "unknown option(s) --text_encoder_lr1 (did you mean 'network.text_encoder_lr'?)"}


def info(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^# (\w+): (.*)$", path.read_text(), re.M))


@pytest.fixture(autouse=True)
def xformers_installed(monkeypatch):
    """The corpus comes from CUDA machines with xformers; this one has none (the check is tested elsewhere)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: True if name == "xformers" else real(name, *a))
    monkeypatch.setattr("library.config_checks._xformers_problem", lambda: None)  # nor would it import


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """Every @PLACEHOLDER@ of the corpus: files and folders that exist (no model is loaded here)."""
    root = tmp_path_factory.mktemp("corpus")
    for name in ("model.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl.safetensors",
                 "ae.safetensors", "weights.safetensors", "qwen3.safetensors"):
        (root / name).write_bytes(b"")
    (root / "meta.json").write_text('{"img_001": {"caption": "a photo", "tags": "dog"}}')  # fine-tune metadata
    for name in ("data", "reg", "vae", "cond", "resume"):
        (root / name).mkdir()
    (root / "resume" / "state.json").write_text("{}")
    (root / "prompts.txt").write_text("a photo of a cat --w 64 --h 64\n")
    (root / "dataset.toml").write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{root / "data"}"\n')
    return {"@MODEL@": root / "model.safetensors", "@CLIP_L@": root / "clip_l.safetensors",
            "@CLIP_G@": root / "clip_g.safetensors", "@T5XXL@": root / "t5xxl.safetensors", "@AE@": root / "ae.safetensors",
            "@VAE@": root / "vae", "@DATA@": root / "data", "@REG@": root / "reg", "@DATASET@": root / "dataset.toml",
            "@OUT@": root / "out", "@LOGS@": root / "logs", "@PROMPTS@": root / "prompts.txt",
            "@WEIGHTS@": root / "weights.safetensors", "@META@": root / "meta.json", "@COND@": root / "cond",
            "@RESUME@": root / "resume", "@QWEN3@": root / "qwen3.safetensors"}


def substitute(text: str, places: dict) -> str:
    return re.sub(r"@[A-Z0-9_]+@", lambda m: str(places[m.group(0)]).replace("\\", "/"), text)


# what an input error says (an unknown key, a wrong type or value): never a refusal
INPUT_ERRORS = ("unknown key", "unknown option", "must be", "is not one of", "is not supported here",
                "missing required", "not valid", "no such", "both set")


def refusal(line: str) -> str | None:
    """The key a line refuses (a vocabulary refusal, or a check naming the key and what to use instead)."""
    if any(e in line for e in INPUT_ERRORS):
        return None
    m = REFUSED.match(line) or re.match(r"^'(?:\w+\.)?(\w+)'", line)
    return m.group(1) if m else None


def outcome(load) -> tuple[str, list[str]]:
    """("ok", notes) or ("refused", keys) or ("error", lines)."""
    try:
        cfg = load()
    except ConfigError as e:
        text = str(e)  # "<file>: <problem>", or "<file>: N problems:" and one indented line each
        lines = [line.strip() for line in text.splitlines()[1:]] or [text.split(": ", 1)[-1]]
        refused = [refusal(line) for line in lines]
        return ("refused", refused) if None not in refused else ("error", [str(e)])
    return "ok", cfg.notes


def _loader(argv: list[str], recipe: str):
    """What the launch does before any model: parse the command line, load the config, check it for the recipe."""
    def load():
        args = parse(argv, "corpus")
        cfg = load_config(args.config, args.overrides, flags=args.flags)
        check_recipe(cfg, recipe)
        return cfg
    return load


def load_training(path: Path, places: dict, tmp_path: Path):
    """As its users launch it: `--config_file x.toml`, with `--dataset_config` (and the model) on the command line
    where the file leaves them out."""
    import tomllib

    target = tmp_path / path.name
    target.write_text(substitute(path.read_text(), places))
    keys = set(re.findall(r"^(\w+) =", path.read_text(), re.M))
    argv = ["--config_file", str(target)]
    if not keys & {"train_data_dir", "dataset_config"}:
        argv += ["--dataset_config", str(places["@DATASET@"])]
    if "pretrained_model_name_or_path" not in keys:
        argv += ["--pretrained_model_name_or_path", str(places["@MODEL@"])]
    tomllib.loads(target.read_text())  # valid TOML after substitution
    return _loader(argv, info(path).get("recipe", "network"))


def load_command(path: Path, places: dict):
    argv = shlex.split(substitute(path.read_text().splitlines()[-1], places))
    return _loader(argv, info(path).get("recipe", "network"))


def test_the_corpus_is_what_the_issue_asks_for():
    assert len(TRAINING) >= 40 and len(DATASETS) >= 15 and len(COMMANDS) >= 8
    for path in [*TRAINING, *DATASETS, *COMMANDS]:
        assert info(path)["source"].startswith("https://github.com/"), path
        assert not re.search(r"(/content/|C:\\\\|/app/|/home/)", path.read_text()), path  # paths replaced
    families = Counter(info(p).get("family") for p in [*TRAINING, *COMMANDS])
    assert {"sd1", "sdxl", "sd3", "flux"} <= set(families)


@pytest.mark.parametrize("path", TRAINING + COMMANDS, ids=lambda p: p.stem)
def test_each_config_loads_or_is_refused_with_reasons(path, places, tmp_path):
    load = load_training(path, places, tmp_path) if path.suffix == ".toml" else load_command(path, places)
    kind, details = outcome(load)
    if path.stem in EXPECTED_ERRORS:
        assert kind == "error" and EXPECTED_ERRORS[path.stem] in details[0]
    else:
        assert kind in ("ok", "refused"), details[0]


def test_refusals_over_the_corpus(places, tmp_path, capsys):
    stops = Counter()
    for path in TRAINING + COMMANDS:
        load = load_training(path, places, tmp_path) if path.suffix == ".toml" else load_command(path, places)
        kind, details = outcome(load)
        if kind == "refused":
            stops.update(set(details))
    with capsys.disabled():
        print("\nrefused key: corpus files it stops", *[f"  {k}: {n}" for k, n in stops.most_common()], sep="\n")
    assert dict(stops) == EXPECTED_REFUSALS


@pytest.mark.parametrize("path", DATASETS, ids=lambda p: p.stem)
def test_each_dataset_toml_loads(path, places, tmp_path):
    from library.config import DatasetSection
    from library.data.dataset_config import layout_from_toml

    target = tmp_path / path.name
    target.write_text(substitute(path.read_text(), places))
    kind, details = outcome(lambda: layout_from_toml(target, DatasetSection()))
    assert kind in ("ok", "refused"), details[0]
    assert sorted(details if kind == "refused" else []) == EXPECTED_DATASET_REFUSALS.get(path.stem, [])


# SD1: fp16, cached latents, 8-bit; 225 tokens; LyCORIS preset attn-mlp with 150 tokens and multires noise
RUN_SAMPLE = ["offlive_setting", "thr3a_config", "sd_scripts_doc_sd1", "archgen_training", "easylora_lycoris"]


@pytest.mark.parametrize("name", RUN_SAMPLE)
def test_a_sample_trains_two_steps(name, places, tiny_sd1, tiny_data, tmp_path):
    """Loaded as published, then made small for the CPU: the tiny SD1 model and images, 2 steps at 64 px, no
    xformers (not installed here), no sample images, no warmup."""
    import math

    from train_network import train

    path = next(p for p in TRAINING + COMMANDS if p.stem == name)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tiny_data}"\n')
    run_places = {**places, "@MODEL@": tiny_sd1[0], "@DATA@": tiny_data, "@DATASET@": dataset,
                  "@OUT@": tmp_path / "out"}
    load = load_training(path, run_places, tmp_path) if path.suffix == ".toml" else load_command(path, run_places)
    cfg = load()
    cfg.train.xformers, cfg.sample.sample_prompts = False, None
    cfg.train.max_train_epochs, cfg.train.max_train_steps, cfg.dataset.resolution = None, 2, 64
    cfg.dataset.min_bucket_reso = min(cfg.dataset.min_bucket_reso, 64)  # buckets around 64 px too
    cfg.optimizer.lr_warmup_steps = 0  # a warmup in steps outlasts 2 steps
    result = train(cfg)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert result.adapter_path.is_file()


# What sd-scripts uses for these published configs, read by hand from each file and sd-scripts' defaults
# (network_alpha 1, sdxl_train's text-encoder rates each defaulting to learning_rate).
SD_SCRIPTS_VALUES = {
    "offlive_setting": {"network.network_dim": 8, "network.network_alpha": 1.0, "network.unet_lr": 5e-5,
                        "network.text_encoder_lr": 2.5e-5, "optimizer.optimizer_type": "AdamW8bit",
                        "optimizer.lr_scheduler": "cosine", "train.mixed_precision": "fp16",
                        "train.max_train_steps": 3000, "train.seed": 0, "save.save_every_n_steps": 200,
                        "save.save_precision": "fp16"},
    "thr3a_config": {"network.network_dim": 8, "network.network_alpha": 4.0, "network.unet_lr": 1e-4,
                     "network.text_encoder_lr": 1e-5, "model.clip_skip": 2, "loss.min_snr_gamma": 5.0,
                     "train.max_train_steps": 500, "optimizer.lr_scheduler": "cosine_with_restarts",
                     "optimizer.lr_scheduler_num_cycles": 1, "train.seed": 99},
    "sd_scripts_doc_sd1": {"network.network_dim": 16, "network.network_alpha": 1.0, "optimizer.learning_rate": 1e-4,
                           "optimizer.optimizer_type": "AdamW8bit", "optimizer.lr_scheduler": "constant",
                           "train.max_train_epochs": 10, "save.save_every_n_epochs": 1,
                           "train.mixed_precision": "fp16", "train.gradient_checkpointing": True, "train.sdpa": True},
    "sd_scripts_doc_sdxl_train": {"optimizer.learning_rate": 1e-5, "dreambooth.learning_rate_te": 5e-6,
                                  "dreambooth.learning_rate_te2": 2e-6, "dreambooth.train_text_encoder": True},
    "gradients_phoenix_sdxl": {"network.network_dim": 64, "network.network_alpha": 32.0, "network.unet_lr": 3e-4,
                               "network.text_encoder_lr": 1e-5, "network.network_dropout": 0.05,
                               "network.scale_weight_norms": 5.0, "loss.loss_type": "l1", "loss.min_snr_gamma": 5.0,
                               "optimizer.max_grad_norm": 0.5, "optimizer.optimizer_args": ["weight_decay=0.01"],
                               "optimizer.lr_scheduler": "cosine", "train.max_train_epochs": 120,
                               "dataset.resolution": [1024, 1024], "dataset.train_batch_size": 8},
    # Adafactor with relative_step=False given (no sd-scripts default added): the learning rate drives it
    "motimalu_sdxl_full_fp32_vpred": {"optimizer.optimizer_args": ["scale_parameter=False", "relative_step=False",
                                                                   "warmup_init=False"],
                                      "optimizer.learning_rate": 6e-6, "dreambooth.train_text_encoder": True,
                                      "train.mixed_precision": "no", "dataset.train_batch_size": 4,
                                      "model.v_parameterization": True, "loss.noise_offset": 0.0357},
    "sd_scripts_doc_anima": {"network.network_module": "networks.lora", "network.network_dim": 8,
                             "network.network_alpha": 1.0, "loss.timestep_sampling": "sigmoid",
                             "loss.discrete_flow_shift": 1.0, "train.cache_text_encoder_outputs": True},
    "sd_scripts_doc_sd3": {"network.network_dim": 16, "network.network_alpha": 1.0, "train.blocks_to_swap": 32,
                           "loss.weighting_scheme": "uniform", "train.mixed_precision": "fp16",
                           "train.max_train_epochs": 10, "optimizer.optimizer_type": "AdamW8bit"},
}


@pytest.mark.parametrize("name", sorted(SD_SCRIPTS_VALUES))
def test_resolved_values_are_those_sd_scripts_uses(name, places, tmp_path):
    path = next(p for p in TRAINING + COMMANDS if p.stem == name)
    cfg = (load_training(path, places, tmp_path) if path.suffix == ".toml" else load_command(path, places))()
    got = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in SD_SCRIPTS_VALUES[name]}
    assert got == SD_SCRIPTS_VALUES[name]


def test_cosine_with_min_lr_command_line_gets_sd_scripts_schedule(places):
    """gui_docker_flux: cosine_with_min_lr, ratio 0.1, num_cycles 2 (one whole wave), warmup 0.1; its
    lr_decay_steps = 0.5 is kept but not read by this schedule, as in sd-scripts."""
    import torch

    from library.optim import schedule_of

    cfg = load_command(CORPUS / "command_lines" / "gui_docker_flux.txt", places)()
    o = cfg.optimizer
    assert (o.lr_scheduler, o.lr_scheduler_min_lr_ratio, o.lr_scheduler_num_cycles, o.lr_warmup_steps,
            o.lr_decay_steps) == ("cosine_with_min_lr", 0.1, 2, 0.1, 0.5)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler, lrs = schedule_of(o, optimizer, 100), []
    for _ in range(101):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert (lrs[5], lrs[10], lrs[55], lrs[100]) == pytest.approx((0.5e-4, 1e-4, 0.1e-4, 1e-4))
