"""sd-scripts users change nothing: every sd-scripts option is known (implemented, a no-op with a note, or
refused with a reason), its command-line flags parse as sd-scripts parses them, and the values that change
training are read as sd-scripts reads them."""
import subprocess
import sys
from pathlib import Path

import pytest

from library.config import ConfigError, key_to_section, optimizer_kwargs
from library.config_files import config_from_dict, load_config
from library.sd_args import parse
from library.sd_vocab import VOCAB

from conftest import ROOT

OPTIONS = Path(__file__).parent / "sdscripts_corpus" / "sd_scripts_options.txt"


def _sd_scripts_options() -> dict[str, str]:
    rows = [line.split() for line in OPTIONS.read_text().splitlines() if line and not line.startswith("#")]
    return {name: kind for name, kind, _scripts in rows}


def test_every_sd_scripts_option_is_known_once():
    ours = key_to_section()
    options = _sd_scripts_options()
    assert len(options) > 240
    unknown = [k for k in options if k not in ours and k not in VOCAB and k != "config_file"]
    assert unknown == []
    assert [k for k in VOCAB if k in ours] == []  # a key is ours or in the table, never both
    for key, entry in VOCAB.items():
        assert entry.status in ("mapped", "noop", "refused", "gui") and entry.note, key


def test_every_flag_kind_matches_sd_scripts():
    """A flag here takes values the way sd-scripts' flag of the same name does."""
    parser_kinds = {}
    from library.sd_args import build_parser

    for action in build_parser("x")._actions:
        if action.dest and action.option_strings:
            kind = ("flag" if action.nargs == 0 else "list" if action.nargs == "*" else
                    getattr(action.type, "__name__", "str"))
            parser_kinds[action.option_strings[0][2:]] = kind
    mismatched = {k: (kind, parser_kinds.get(k)) for k, kind in _sd_scripts_options().items()
                  if k not in ("config_file", "dataset_config")
                  and {"int_or_float": "_int_or_float", "Path": "str"}.get(kind, kind) != parser_kinds.get(k)}
    assert mismatched == {}


@pytest.fixture
def paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    return model, data, tmp_path / "out"


def _flat(paths, **keys) -> dict:
    model, data, out = paths
    return {"pretrained_model_name_or_path": str(model), "train_data_dir": str(data), "output_dir": str(out), **keys}


def test_command_line_alone_both_spellings_flags_and_lists(paths):
    model, data, out = paths
    args = parse([f"--pretrained_model_name_or_path={model}", "--train_data_dir", str(data), "--output_dir", str(out),
                  "--network_dim", "16", "--network_alpha=8", "--enable_bucket", "--xformers",
                  "--network_args", "conv_dim=4", "conv_alpha=1", "--optimizer_args", "weight_decay=0.01",
                  "betas=0.9,0.99", "--resolution", "768,512", "--lr_warmup_steps", "0.1", "--text_encoder_lr",
                  "5e-5", "--set", "train.max_train_steps=7"], "test")
    assert args.config is None and args.overrides == ["train.max_train_steps=7"]
    args.flags.pop("xformers")  # not installed here: the check would refuse it
    cfg = load_config(None, args.overrides, flags=args.flags)
    n, d = cfg.network, cfg.dataset
    assert (n.network_dim, n.network_alpha, n.network_args) == (16, 8.0, ["conv_dim=4", "conv_alpha=1"])
    assert d.enable_bucket is True and d.resolution == [768, 512] and cfg.optimizer.lr_warmup_steps == 0.1
    assert n.text_encoder_lr == 5e-5 and cfg.train.max_train_steps == 7 and cfg.source == "command line"
    assert optimizer_kwargs(cfg.optimizer.optimizer_args) == {"weight_decay": 0.01, "betas": (0.9, 0.99)}


def test_command_line_wins_over_config_file(tmp_path, paths):
    toml = tmp_path / "sd.toml"
    model, data, out = paths
    toml.write_text(f'[model_arguments]\npretrained_model_name_or_path = "{model}"\n'
                    f'[training_arguments]\noutput_dir = "{out}"\ntrain_data_dir = "{data}"\nnetwork_dim = 32\n'
                    f'learning_rate = 1e-4\ncache_latents = true\n')
    args = parse(["--config_file", str(toml), "--network_dim", "8", "--learning_rate=3e-4"], "test")
    cfg = load_config(args.config, args.overrides, flags=args.flags)
    assert (cfg.network.network_dim, cfg.optimizer.learning_rate, cfg.dataset.cache_latents) == (8, 3e-4, True)
    assert str(toml) in cfg.source
    ours = tmp_path / "ours.toml"  # our sectioned layout takes flags on top too
    ours.write_text(f'[model]\npretrained_model_name_or_path = "{model}"\n[dataset]\ntrain_data_dir = "{data}"\n'
                    f'[train]\noutput_dir = "{out}"\n[network]\nnetwork_dim = 32\n')
    cfg = load_config(ours, flags=parse(["--network_dim", "2", "--use_8bit_adam"], "t").flags)
    assert cfg.network.network_dim == 2 and cfg.optimizer.optimizer_type == "AdamW8bit"


@pytest.mark.parametrize("argv, message", [
    (["--network_dimm", "4"], "unknown option(s) --network_dimm (did you mean 'network.network_dim'?)"),
    (["--network_dim", "four"], "argument --network_dim: invalid int value: 'four'"),
    (["--enable_bucket=true"], "ignored explicit argument"),
])
def test_bad_command_lines_are_config_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        parse(argv, "test")
    assert message in str(e.value)


def test_cli_exits_2_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "train_network.py"), "--network_dim", "4",
                          "--enable_wildcard", "--output_dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("config error: command line:")
    assert "'enable_wildcard' = True is refused: wildcard captions ({a|b}) are not offered" in run.stderr


def test_help_lists_every_option_with_its_help():
    run = subprocess.run([sys.executable, str(ROOT / "train_network.py"), "--help"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    for key in ("--network_dim", "--use_8bit_adam", "--huggingface_repo_id", "--noise_offset_type", "--set"):
        assert key in text
    assert "LoRA rank of attention/MLP linears" in text  # the schema's help
    assert "uploading to the Hub is not offered" in text  # the table's reason


@pytest.mark.parametrize("typo, wrong", [("max_token_length", "t5xxl_max_token_length"),
                                         ("dataset_repeats", "num_repeats"), ("train_blocks", "train_batch_size")])
def test_known_keys_never_suggest_a_key_of_another_meaning(paths, typo, wrong):
    cfg = config_from_dict(_flat(paths, **{typo: {"max_token_length": 150, "dataset_repeats": 3,
                                                   "train_blocks": "all"}[typo]}), source="x.toml")
    assert all(wrong not in note for note in cfg.notes)
    from library.config import did_you_mean

    assert wrong not in did_you_mean(typo + "z")
    assert did_you_mean("netwrok_dim") == " (did you mean 'network.network_dim'?)"


def test_noop_gui_and_default_keys_are_noted(paths):
    cfg = config_from_dict(_flat(paths, lowram=False, dynamo_backend="no", lr_scheduler_args=[],
                                 huggingface_repo_id="", epoch=10, noise_offset_type="Original",
                                 debug_dataset=False, wandb_run_name="r"), source="gui.toml")
    notes = "\n".join(cfg.notes)
    assert "'epoch': written by the kohya_ss GUI" in notes and "'noise_offset_type'" in notes
    assert "'wandb_run_name' accepted, no effect" in notes
    assert "at their default, no effect here either: huggingface_repo_id, debug_dataset" in notes
    assert "'caption_extension' is not set: sd-scripts' default is '.caption', this trainer's is '.txt'" in notes


def test_refusals_name_every_key_with_reason(paths):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_flat(paths, enable_wildcard=True, face_crop_aug_range="2.0,3.0", network_module="networks.oft",
                               use_8bit_adam=True, optimizer_type="Lion"), source="x.toml")
    text = str(e.value)
    assert text.startswith("x.toml: 4 problem(s):")
    assert "'enable_wildcard' = True is refused: wildcard captions ({a|b}) are not offered" in text
    assert "'face_crop_aug_range' = '2.0,3.0' is refused" in text and "'network_module' = 'networks.oft'" in text
    assert "both use_8bit_adam and optimizer_type are set" in text


@pytest.mark.parametrize("args, expected", [
    (["betas=0.9,0.99"], {"betas": (0.9, 0.99)}),
    (["betas=[0.9, 0.999]", "weight_decay=1e-2"], {"betas": [0.9, 0.999], "weight_decay": 0.01}),
    (["decouple=True", "use_bias_correction=true", "d_coef=2"], {"decouple": True, "use_bias_correction": True,
                                                                  "d_coef": 2}),
])
def test_optimizer_args_are_python_literals(args, expected):
    assert optimizer_kwargs(args) == expected


def test_optimizer_args_that_are_no_literal_stop_before_loading(paths):
    with pytest.raises(ConfigError, match=r"'optimizer.optimizer_args': 'eps=tiny': the value must be a Python"):
        config_from_dict(_flat(paths, optimizer_args=["eps=tiny"]), source="x.toml")


def test_optimizer_with_tuple_betas_builds():
    import torch

    from library.optim import build_optimizer

    param = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer("AdamW", [{"params": [param]}], 1e-3, ["betas=0.9,0.99", "weight_decay=0.1"])
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("keys, expected", [
    ({"use_8bit_adam": True}, "AdamW8bit"), ({"use_lion_optimizer": True}, "Lion"),
    ({"use_8bit_adam": False, "optimizer_type": "Prodigy"}, "Prodigy"),
])
def test_old_optimizer_switches(paths, keys, expected):
    assert config_from_dict(_flat(paths, **keys), source="x.toml").optimizer.optimizer_type == expected


@pytest.mark.parametrize("keys, expected", [
    ({"text_encoder_lr": [1e-5, 2e-5]}, 1e-5),  # networks.lora: the first rate for every encoder
    ({"text_encoder_lr": [1e-5, 2e-5], "network_module": "networks.lora_flux"}, [1e-5, 2e-5]),
    ({"text_encoder_lr": [3e-5], "network_module": "networks.lora_sd3"}, [3e-5]),
    ({"text_encoder_lr": []}, None), ({"text_encoder_lr": 4e-5}, 4e-5),
])
def test_text_encoder_lr_lists_as_sd_scripts(paths, keys, expected):
    cfg = config_from_dict(_flat(paths, **keys), source="x.toml")
    assert cfg.network.text_encoder_lr == expected and cfg.network.network_module == "networks.lora"


def test_per_encoder_rates_reach_the_groups():
    from networks.blockwise import _encoder_rate

    assert [_encoder_rate([1e-5, 2e-5], i) for i in (0, 1)] == [1e-5, 2e-5]
    assert [_encoder_rate([1e-5], i) for i in (0, 1)] == [1e-5, 1e-5]
    assert _encoder_rate(3e-5, 1) == 3e-5 and _encoder_rate(None, 0) is None


def test_sdxl_train_text_encoder_rates(paths):
    cfg = config_from_dict(_flat(paths, learning_rate=1e-5, learning_rate_te1=3e-6, learning_rate_te2=2e-6),
                           source="x.toml")
    assert (cfg.dreambooth.learning_rate_te, cfg.dreambooth.learning_rate_te2) == (3e-6, 2e-6)
    only_te1 = config_from_dict(_flat(paths, learning_rate=1e-5, learning_rate_te1=3e-6), source="x.toml")
    assert only_te1.dreambooth.learning_rate_te2 == 1e-5  # sd-scripts: te2 defaults to learning_rate


def test_file_metadata_as_sd_scripts_writes_it(paths):
    from networks.files import with_user_metadata

    meta = {"ss_network_dim": "4", "ss_seed": "1", "ss_tag_frequency": "{}", "modelspec.title": "last"}
    cfg = config_from_dict(_flat(paths, metadata_author="me", metadata_title="T", training_comment="hi",
                                 metadata_trigger_phrase="sks"), source="x.toml")
    out = with_user_metadata(meta, cfg.save)
    assert out["modelspec.author"] == "me" and out["modelspec.title"] == "T" and out["ss_training_comment"] == "hi"
    assert out["modelspec.trigger_phrase"] == "sks" and out["ss_seed"] == "1"
    cfg.save.no_metadata = True
    assert set(with_user_metadata(meta, cfg.save)) == {"ss_network_dim", "modelspec.title", "modelspec.author",
                                                       "modelspec.trigger_phrase"}


def test_resolved_config_records_what_the_dataset_toml_sets(tmp_path, paths):
    import tomllib

    from library.config_files import write_resolved

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(f'[general]\nenable_bucket = true\nshuffle_caption = true\n[[datasets]]\nresolution = 896\n'
                       f'batch_size = 2\nmax_bucket_reso = 1536\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\n'
                       f'num_repeats = 10\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "b"}"\nnum_repeats = 1\n')
    cfg = config_from_dict(_flat(paths, dataset_config=str(dataset)), source="x.toml")
    write_resolved(cfg, tmp_path / "r.toml")
    text = (tmp_path / "r.toml").read_text()
    d = tomllib.loads(text)["dataset"]
    assert (d["resolution"], d["train_batch_size"], d["enable_bucket"], d["max_bucket_reso"]) == (896, 2, True, 1536)
    assert d["shuffle_caption"] is True and d["num_repeats"] == 10
    assert "#   num_repeats differs between subsets: [10, 1]" in text


def test_fp16_with_cached_latents_trains_on_the_cpu(make_config):
    import math

    from train_network import train

    cfg = make_config(dataset={"cache_latents": True}, train={"mixed_precision": "fp16", "max_train_steps": 2})
    result = train(cfg)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


def test_fp16_with_an_fp32_vae_is_refused_on_the_cpu_before_loading(make_config, monkeypatch):
    import library.model_files
    import train_network

    monkeypatch.setattr(library.model_files, "load_model", lambda *a: pytest.fail("a model was loaded"))
    cfg = make_config(train={"mixed_precision": "fp16", "no_half_vae": True})
    with pytest.raises(ConfigError, match="'train.no_half_vae' with mixed_precision = \"fp16\" cannot run on the CPU"):
        train_network.train(cfg)


def test_long_captions_in_75_token_windows(tiny_sd1):
    """max_token_length 150: the first window of a short caption is its usual 77 tokens, so its states are the
    usual ones; a long caption keeps the tokens beyond 75 instead of cutting them."""
    from types import SimpleNamespace

    import torch

    from library import long_prompts
    from library.families import ModelSource, get_family

    family = get_family("auto", str(tiny_sd1[0]))
    parts = family.load(ModelSource(path=str(tiny_sd1[0])))
    tokenizer = parts.tokenizers["te"]
    short, long = "a photo of a cat", " ".join(["red cat"] * 60)  # 120 words
    ids = long_prompts.window_ids(tokenizer, [short, long], 2)
    assert ids.shape == (4, 77)
    usual = tokenizer([short], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids[0], usual[0])
    assert ids[3, 0] == tokenizer.bos_token_id and ids[3, 1] != tokenizer.eos_token_id  # the 2nd window has text
    with torch.no_grad():
        plain = family.encode_prompts(parts, [short, long], 1)["encoder_hidden_states"]
        parts.source = SimpleNamespace(max_token_length=150)
        windowed = family.encode_prompts(parts, [short, long], 1)["encoder_hidden_states"]
        windowed_skip = family.encode_prompts(parts, [short], 2)["encoder_hidden_states"]
    assert plain.shape[1] == 77 and windowed.shape[1] == 152 and windowed_skip.shape[1] == 152
    torch.testing.assert_close(windowed[0, :76], plain[0, :76])
    assert not torch.allclose(windowed[1, 76:151], windowed[0, 76:151])  # the long caption's 2nd window differs


def test_long_captions_train_sdxl_two_steps(tiny_sdxl, tiny_data, tmp_path):
    import math

    from library.config_files import config_from_dict
    from train_network import train

    cfg = config_from_dict({"model": {"pretrained_model_name_or_path": str(tiny_sdxl[0]), "max_token_length": 225},
                            "dataset": {"train_data_dir": str(tiny_data), "resolution": 64},
                            "train": {"output_dir": str(tmp_path / "out"), "max_train_steps": 2, "seed": 3}},
                           source="t.toml")
    result = train(cfg)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


def test_dim_from_weights_reads_the_file(paths, tmp_path):
    import torch
    from safetensors.torch import save_file

    def lora(path, dims):
        tensors = {}
        for i, dim in enumerate(dims):
            tensors[f"lora_unet_l{i}.lora_down.weight"] = torch.zeros(dim, 8)
            tensors[f"lora_unet_l{i}.lora_up.weight"] = torch.zeros(8, dim)
            tensors[f"lora_unet_l{i}.alpha"] = torch.tensor(float(dim) / 2)
        tensors["lora_unet_c.lora_down.weight"] = torch.zeros(4, 8, 3, 3)
        tensors["lora_unet_c.alpha"] = torch.tensor(1.0)
        save_file(tensors, str(path))
        return path

    same = lora(tmp_path / "same.safetensors", [16, 16])
    cfg = config_from_dict(_flat(paths, network_weights=str(same), dim_from_weights=True, network_dim=4),
                           source="x.toml")
    n = cfg.network
    assert (n.network_dim, n.network_alpha, n.conv_dim, n.conv_alpha) == (16, 8.0, 4, 1.0)
    mixed = lora(tmp_path / "mixed.safetensors", [16, 8])
    with pytest.raises(ConfigError, match="'dim_from_weights' = True is refused: the file's linear layers have "
                                          "different ranks"):
        config_from_dict(_flat(paths, network_weights=str(mixed), dim_from_weights=True), source="x.toml")


@pytest.mark.parametrize("keys, trains", [
    ({}, True),  # train_db.py (SD1 / SD2): the text encoder trains by default
    ({"t5xxl": "t5.safetensors", "ae": "ae.safetensors"}, False),  # flux_train: never
    ({"learning_rate_te1": 1e-6}, False),  # sdxl_train without train_text_encoder
    ({"learning_rate_te1": 1e-6, "train_text_encoder": True}, True),
    ({"cache_text_encoder_outputs": True}, False),
])
def test_full_fine_tune_text_encoder_as_that_sd_scripts_script(paths, tmp_path, keys, trains):
    for name in ("t5.safetensors", "ae.safetensors"):
        (tmp_path / name).write_bytes(b"")
    keys = {k: str(tmp_path / v) if k in ("t5xxl", "ae") else v for k, v in keys.items()}
    cfg = config_from_dict(_flat(paths, **keys), source="x.toml")
    assert cfg.dreambooth.train_text_encoder is trains


@pytest.mark.parametrize("family, keys, trains", [
    ("sd1", {}, True),  # train_db.py
    ("sdxl", {}, False),  # sdxl_train: only when asked
    ("sdxl", {"train_text_encoder": True}, True),
    ("sd3", {}, False),
    ("sd3", {"train_text_encoder": True}, True),
    ("flux", {"train_text_encoder": True}, False),  # flux_train: never
])
def test_text_encoder_once_the_family_is_known(paths, family, keys, trains):
    from library.sd_flat import text_encoder_of_family

    cfg = config_from_dict(_flat(paths, **keys), source="x.toml")
    assert cfg.dreambooth.train_text_encoder is True  # no hint key: the family decides, once known
    note = text_encoder_of_family(cfg, family)
    assert cfg.dreambooth.train_text_encoder is trains and (note is None) is trains
    ours = config_from_dict({"model": {"pretrained_model_name_or_path": str(paths[0])},
                             "dataset": {"train_data_dir": str(paths[1])}, "train": {"output_dir": str(paths[2])}})
    assert text_encoder_of_family(ours, family) is None and ours.dreambooth.train_text_encoder  # our schema: as set


@pytest.mark.parametrize("keys, recipe, fp8", [
    ({"fp8_base_unet": True}, "db", False),  # the full fine-tunes ignore fp8_base_unet
    ({"fp8_base_unet": True, "fp8_base": False}, "db", False),  # the GUI writes both
    ({"fp8_base_unet": True}, "network", True),  # *_train_network: fp8 denoiser
    ({"fp8_base": True}, "db", True),  # asked for: refused below
])
def test_fp8_base_unet_only_where_sd_scripts_reads_it(paths, keys, recipe, fp8):
    from library.config_checks import check_recipe

    cfg = config_from_dict(_flat(paths, mixed_precision="bf16", **keys), source="x.toml")
    if fp8 and recipe == "db":
        with pytest.raises(ConfigError, match="'train.fp8_base' stores frozen weights in float8"):
            check_recipe(cfg, recipe)
        return
    check_recipe(cfg, recipe)
    assert cfg.train.fp8_base is fp8
    assert any("'fp8_base_unet' is ignored" in n for n in cfg.notes) is (recipe == "db")


@pytest.mark.parametrize("keys, swapped", [
    ({"double_blocks_to_swap": 6, "single_blocks_to_swap": 12}, 18),
    ({"double_blocks_to_swap": 0, "single_blocks_to_swap": 10}, 10),  # the GUI writes both
    ({"double_blocks_to_swap": 6, "blocks_to_swap": 4}, 4),  # blocks_to_swap wins, as in sd-scripts
    ({"double_blocks_to_swap": 0, "single_blocks_to_swap": 0}, 0),
])
def test_double_and_single_blocks_to_swap(paths, keys, swapped):
    cfg = config_from_dict(_flat(paths, gradient_checkpointing=True, **keys), source="x.toml")
    assert cfg.train.blocks_to_swap == swapped
    assert any("double_blocks_to_swap" in n for n in cfg.notes) is bool(swapped and "blocks_to_swap" not in keys)


def test_lr_scheduler_type_and_args_as_sd_scripts_passes_them(paths):
    import math

    import torch

    from library.optim import build_scheduler

    def lrs(scheduler, optimizer, steps=4):
        out = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    def fresh():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    opt = fresh()
    got = lrs(build_scheduler("constant", opt, 0, 8, scheduler_type="CosineAnnealingLR",
                              scheduler_args=["T_max=8", "eta_min=0.1"]), opt)
    assert got == pytest.approx([0.1 + 0.9 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(1, 5)])
    opt = fresh()
    quarter = lrs(build_scheduler("cosine", opt, 0, 8, scheduler_args=["num_cycles=0.25"]), opt)
    assert quarter == pytest.approx([(1 + math.cos(math.pi * 2 * 0.25 * t / 8)) / 2 for t in range(1, 5)])
    cfg = config_from_dict(_flat(paths, lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_max=100"]),
                           source="x.toml")
    assert cfg.optimizer.lr_scheduler_args == ["T_max=100"]
    with pytest.raises(ConfigError, match="classes have no warmup"):
        config_from_dict(_flat(paths, lr_scheduler_type="StepLR", lr_warmup_steps=10), source="x.toml")


def test_random_strength_noise_offset_and_ip_gamma():
    """sd-scripts' *_random_strength: the strength is scaled by one U(0, 1) draw per batch."""
    import torch

    from library.objectives import LossOptions, draw_noise

    shape = (2, 4, 8, 8)
    options = LossOptions(noise_offset=0.1, noise_offset_random_strength=True, ip_noise_gamma=0.2,
                          ip_noise_gamma_random_strength=True)
    target, noised = draw_noise(shape, torch.Generator().manual_seed(5), options)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(shape, generator=g)
    offset = 0.1 * torch.rand((), generator=g).item()
    noise = noise + offset * torch.randn((2, 4, 1, 1), generator=g)
    gamma = 0.2 * torch.rand((), generator=g).item()
    torch.testing.assert_close(target, noise)
    torch.testing.assert_close(noised, noise + gamma * torch.randn(shape, generator=g))
    fixed, _ = draw_noise(shape, torch.Generator().manual_seed(5), LossOptions(noise_offset=0.1))
    assert not torch.allclose(fixed, target)


def test_save_n_epoch_ratio_sets_the_epoch_cadence(make_config, capsys):
    from library.training import prepare_data

    cfg = make_config(train={"max_train_epochs": 7}, save={"save_n_epoch_ratio": 3})
    prepare_data(cfg, print)
    assert cfg.save.save_every_n_epochs == 2  # floor(7 / 3)
    assert "save_n_epoch_ratio 3: saving every 2 epochs" in capsys.readouterr().out


def test_sd_scripts_value_spellings(paths):
    cfg = config_from_dict(_flat(paths, optimizer_args="", network_args="", sample_sampler="dpm_2_a"),
                           source="x.toml")
    assert (cfg.optimizer.optimizer_args, cfg.network.network_args, cfg.sample.sample_sampler) == ([], [], "k_dpm_2_a")
    with pytest.raises(ConfigError) as e:
        config_from_dict(_flat(paths, save_model_as="ckpt", log_with="all"), source="x.toml")
    assert "'save_model_as' = 'ckpt' is refused: use safetensors" in str(e.value)
    assert "'log_with' = 'all' is refused: choose tensorboard or wandb" in str(e.value)


def test_lora_rank_and_module_dropout_as_sd_scripts():
    """rank_dropout: ranks of the down output zeroed per example with probability p, the rest scaled by
    1 / (1 - p); module_dropout: the adapter skipped; neither in eval mode."""
    import torch
    from torch import nn

    from networks.settings import NetworkSettings
    from library.families.base import AdapterTarget
    from networks.targets import inject

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

    def adapted(**dropouts):
        torch.manual_seed(0)
        root = Root()
        target = AdapterTarget("denoiser", "lora_unet", linear_parents=("Block",), conv_parents=())
        component = inject(root, target, NetworkSettings(dim=4, alpha=4.0, **dropouts))
        layer = dict(component.adapter_layers())["block.proj"]
        nn.init.normal_(layer.lora_B["default"].weight)
        return root, layer

    x = torch.randn(3, 5, 8)
    root, layer = adapted(rank_dropout=0.5)
    down, up = layer.lora_A["default"], layer.lora_B["default"]
    torch.manual_seed(1)
    got = root.block.proj(x)
    torch.manual_seed(1)
    keep = (torch.rand(3, 1, 4) > 0.5).float()
    expected = layer.base_layer(x) + up(x @ down.weight.T * keep / 0.5)  # scaling alpha / dim = 1; no hook
    torch.testing.assert_close(got, expected)
    root.eval()
    torch.testing.assert_close(root.block.proj(x), layer.base_layer(x) + up(x @ down.weight.T))
    root, layer = adapted(module_dropout=0.999)
    torch.testing.assert_close(root.block.proj(x), layer.base_layer(x))


def test_empty_strings_and_false_mean_unset_as_in_sd_scripts(paths):
    cfg = config_from_dict(_flat(paths, sample_prompts="", resume=False, vae="", network_weights="", log_prefix=""),
                           source="gui.toml")
    assert (cfg.sample.sample_prompts, cfg.save.resume, cfg.model.vae, cfg.network.network_weights) == (None,) * 4
    assert any("sample_prompts, resume, vae, network_weights, log_prefix" in note for note in cfg.notes)


@pytest.mark.parametrize("keys, expected", [
    ({"optimizer_type": "Adafactor"}, ["relative_step=True", "scale_parameter=True"]),  # sd-scripts' defaults
    ({"optimizer_type": "adafactor", "optimizer_args": ["relative_step=False"]},
     ["relative_step=False", "scale_parameter=True"]),
    ({"optimizer_type": "Adafactor", "optimizer_args": ["scale_parameter=False", "relative_step=False",
                                                        "warmup_init=False"]},
     ["scale_parameter=False", "relative_step=False", "warmup_init=False"]),
    ({"optimizer_type": "AdamW", "optimizer_args": ["weight_decay=0.1"]}, ["weight_decay=0.1"]),
])
def test_adafactor_arguments_as_sd_scripts_defaults_them(paths, keys, expected):
    cfg = config_from_dict(_flat(paths, **keys), source="x.toml")
    assert cfg.optimizer.optimizer_args == expected
    relative = any("relative_step" in n for n in cfg.notes if "not used" in n)
    assert relative == (keys.get("optimizer_args") is None)


def test_weighted_caption_grammar():
    """A1111 / sd-scripts prompt attention, the published examples: (x) x1.1, [x] /1.1, (x:w) xw, nesting
    multiplies, unbalanced brackets apply to the rest, escapes are literal."""
    from library.prompt_weights import parse_weighted

    assert parse_weighted("normal text") == [("normal text", 1.0)]
    assert parse_weighted("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_weighted("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_weighted(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_weighted("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_weighted("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
                (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)
    assert parse_weighted("x:2) y") == [("x:2) y", 1.0)]  # no open bracket: plain text


@pytest.mark.parametrize("max_token_length", [None, 150])
def test_weighted_captions_scale_each_tokens_state_sd1(tiny_sd1, max_token_length):
    """SD1 with weighted_captions: the states are the plain caption's ("a red cat dog") with each token's state
    times its weight: red x1.5, dog /1.1, the rest (BOS, EOS, padding) x1; a caption without brackets encodes as
    without the option; in 75-token windows too."""
    from types import SimpleNamespace

    import torch

    from library.families import ModelSource, get_family

    family = get_family("auto", str(tiny_sd1[0]))
    parts = family.load(ModelSource(path=str(tiny_sd1[0])))
    tok = parts.tokenizers["te"]
    sizes = [len(tok(w).input_ids) - 2 for w in ("a ", "red", " cat ", "dog")]
    weights = [1.0] + [1.0] * sizes[0] + [1.5] * sizes[1] + [1.0] * sizes[2] + [1 / 1.1] * sizes[3]
    with torch.no_grad():
        parts.source = SimpleNamespace(max_token_length=max_token_length, weighted_captions=False)
        plain = family.encode_prompts(parts, ["a red cat dog", "a cat"], 1)["encoder_hidden_states"]
        parts.source.weighted_captions = True
        weighted = family.encode_prompts(parts, ["a (red:1.5) cat [dog]", "a cat"], 1)["encoder_hidden_states"]
    scale = torch.ones(plain.shape[1])
    scale[: len(weights)] = torch.tensor(weights)
    torch.testing.assert_close(weighted[0], plain[0] * scale[:, None], rtol=1e-5, atol=1e-6)
    assert torch.equal(weighted[1], plain[1])  # no brackets: the same ids, weights 1
    assert not torch.allclose(weighted[0], plain[0])


def test_weighted_captions_sdxl_weigh_both_encoders_not_the_pooled_output(tiny_sdxl):
    from types import SimpleNamespace

    import torch

    from library.families import ModelSource, get_family

    family = get_family("auto", str(tiny_sdxl[0]))
    parts = family.load(ModelSource(path=str(tiny_sdxl[0])))
    n = len(parts.tokenizers["te1"]("cat").input_ids) - 2
    with torch.no_grad():
        parts.source = SimpleNamespace(max_token_length=None, weighted_captions=False)
        plain = family.encode_prompts(parts, ["cat"], 1)
        parts.source.weighted_captions = True
        weighted = family.encode_prompts(parts, ["(cat:2)"], 1)
    scale = torch.ones(plain["encoder_hidden_states"].shape[1])
    scale[1: 1 + n] = 2.0
    torch.testing.assert_close(weighted["encoder_hidden_states"], plain["encoder_hidden_states"] * scale[None, :, None])
    torch.testing.assert_close(weighted["text_embeds"], plain["text_embeds"])


def test_weighted_captions_are_refused_for_flow_models(paths):
    with pytest.raises(ConfigError, match="weighted_captions.*FLUX.1 / SD3"):
        config_from_dict(_flat(paths, weighted_captions=True, t5xxl=str(paths[0]), ae=str(paths[0])),
                         source="x.toml")


def test_skip_until_initial_step_trains_on_the_data_a_full_run_has_there(make_config, tmp_path, monkeypatch):
    """sd-scripts' initial_step with skip_until_initial_step: the run starts after 3 optimizer steps on the
    batches the full run trains at steps 4 and 5 (across an epoch boundary), and trains max_train_steps - 3."""
    import library.training
    from train_network import train

    seen = []
    original = library.training.batch_loss

    def spy(family, parts, objective, batch, *args, **kwargs):
        seen.append((tuple(batch["image"]), tuple(batch["caption"])))
        return original(family, parts, objective, batch, *args, **kwargs)

    monkeypatch.setattr(library.training, "batch_loss", spy)
    full = train(make_config(train={"max_train_steps": 5, "output_dir": str(tmp_path / "a")}))
    full_batches, seen[:] = list(seen), []
    skipped = train(make_config(train={"max_train_steps": 5, "output_dir": str(tmp_path / "b"), "initial_step": 3,
                                       "skip_until_initial_step": True}))
    assert len(full.losses) == 5 and len(skipped.losses) == 2
    assert seen == full_batches[3:] and len(set(full_batches)) > 1


@pytest.mark.parametrize("keys, message", [
    ({"initial_step": 3}, "only renumber epochs"),
    ({"initial_epoch": 2, "skip_until_initial_step": True, "resume": "state"}, "saved state's step"),
])
def test_initial_step_without_skipping_or_with_resume_is_refused(paths, keys, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_flat(paths, **keys), source="x.toml", check_paths=False)


def test_schedule_flags_as_sd_scripts_reads_them(paths):
    """--lr_decay_steps / --lr_warmup_steps take steps, a fraction or a percentage (sd-scripts' int_or_float)."""
    model, data, out = paths
    args = parse([f"--pretrained_model_name_or_path={model}", f"--train_data_dir={data}", f"--output_dir={out}",
                  "--lr_scheduler=warmup_stable_decay", "--lr_warmup_steps=20", "--lr_decay_steps", "25%",
                  "--lr_scheduler_min_lr_ratio=0.05", "--lr_scheduler_timescale", "30"], "test")
    o = load_config(None, args.overrides, flags=args.flags).optimizer
    assert (o.lr_scheduler, o.lr_warmup_steps, o.lr_decay_steps, o.lr_scheduler_min_lr_ratio,
            o.lr_scheduler_timescale) == ("warmup_stable_decay", 20, 0.25, 0.05, 30)
