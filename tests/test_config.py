"""Config errors: one clear message naming the key and the file, before any model loads."""
import subprocess
import sys
import textwrap

import pytest

from library.config import ConfigError
from library.config_files import config_from_dict, load_config

from conftest import ROOT


def _write(tmp_path, text, name="x.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def minimal(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    return f"""
    [model]
    pretrained_model_name_or_path = "{model}"
    [dataset]
    train_data_dir = "{data}"
    [train]
    output_dir = "{tmp_path / 'out'}"
    """


def test_defaults_come_from_the_schema(tmp_path, minimal):
    cfg = load_config(_write(tmp_path, minimal))
    assert (cfg.network.network_dim, cfg.network.network_alpha, cfg.optimizer.optimizer_type) == (4, 1.0, "AdamW")
    assert cfg.train.mixed_precision == "no" and cfg.dataset.resolution == 512


def test_unknown_key_suggests_the_right_one(tmp_path, minimal):
    path = _write(tmp_path, minimal + "\n[network]\nnetwork_dimm = 8\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and "network.network_dimm" in str(e.value)
    assert "did you mean 'network.network_dim'" in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path, minimal):
    path = _write(tmp_path, minimal + '\n[network]\nnetwork_dim = "eight"\n')
    with pytest.raises(ConfigError, match=r"x\.toml: 'network\.network_dim' must be an integer, got str 'eight'"):
        load_config(path)


def test_missing_path_is_named(tmp_path, minimal):
    path = _write(tmp_path, minimal.replace('train_data_dir = "', 'train_data_dir = "/nope'))
    with pytest.raises(ConfigError, match=r"'dataset.train_data_dir': no such folder: /nope"):
        load_config(path)


@pytest.mark.parametrize("overrides, message", [
    (["train.full_fp16=true"], "'train.full_fp16' needs 'train.mixed_precision' = \"fp16\""),
    (['network.network_args=["frobnicate=1"]'], "'frobnicate' is not supported here"),
    (["dataset.resolution=500"], "each a multiple of 8"),
    (["optimizer.optimizer_type=AdamX"], "is not one of"),
])
def test_impossible_combinations(tmp_path, minimal, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, minimal), overrides)
    assert message in str(e.value) and "x.toml" in str(e.value)


def test_recipe_specific_checks(tmp_path, minimal):
    from library.config_checks import check_recipe

    cfg = load_config(_write(tmp_path, minimal), ["train.cache_text_encoder_outputs=true", "model.family=sdxl"])
    for recipe, fix in (("network", "network.network_train_unet_only"), ("db", "dreambooth.train_text_encoder")):
        with pytest.raises(ConfigError, match=f"needs a frozen text encoder.*: set '{fix}'"):
            check_recipe(cfg, recipe)
    for family in ("flux", "sd3", "auto"):  # T5 cached while the CLIPs train (auto: checked once the model loads)
        cfg.model.family = family
        check_recipe(cfg, "network")
    fused = load_config(_write(tmp_path, minimal), ["optimizer.fused_backward_pass=true"])
    with pytest.raises(ConfigError, match="fused backward pass is for full fine-tuning"):
        check_recipe(fused, "network")
    check_recipe(fused, "db")
    with pytest.raises(ConfigError, match="cannot accumulate"):
        load_config(_write(tmp_path, minimal), ["optimizer.fused_backward_pass=true",
                                                 "train.gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match="'prodigy' is not"):
        load_config(_write(tmp_path, minimal), ["optimizer.fused_backward_pass=true", "optimizer_type=prodigy"])


def test_set_overrides_qualified_and_bare(tmp_path, minimal):
    cfg = load_config(_write(tmp_path, minimal), ["train.max_train_steps=12", "network_dim=16",
                                                   "optimizer.optimizer_type=adafactor"])
    assert (cfg.train.max_train_steps, cfg.network.network_dim, cfg.optimizer.optimizer_type) == (12, 16, "adafactor")
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(_write(tmp_path, minimal), ["train.max_train_stepz=3"])


def test_flat_sd_scripts_file_maps_supported_keys(tmp_path, minimal):
    model, data = tmp_path / "model.safetensors", tmp_path / "data"
    flat = f"""
    [model_arguments]
    pretrained_model_name_or_path = "{model}"
    v2 = false
    [additional_network_arguments]
    network_module = "networks.lora"
    network_dim = 32
    network_alpha = 16
    network_args = ["conv_dim=8", "conv_alpha=4"]
    [dataset_arguments]
    train_data_dir = "{data}"
    resolution = "512,768"
    [training_arguments]
    output_dir = "{tmp_path / 'out'}"
    train_batch_size = 2
    optimizer_type = "AdamW8bit"
    mixed_precision = "bf16"
    save_model_as = "safetensors"
    """
    with pytest.raises(ConfigError, match="'dataset.resolution' must be an integer or a list of an integer"):
        load_config(_write(tmp_path, flat.replace('"512,768"', '"big"')))
    cfg = load_config(_write(tmp_path, flat))
    assert (cfg.network.network_dim, cfg.network.network_alpha, cfg.dataset.train_batch_size) == (32, 16.0, 2)
    assert cfg.optimizer.optimizer_type == "AdamW8bit" and cfg.dataset.resolution == [512, 768]


def test_flat_file_names_every_unsupported_key_at_once(tmp_path, minimal):
    flat = minimal.replace("[model]", "").replace("[dataset]", "").replace("[train]", "")
    flat += "\nhuggingface_repo_id = \"me/x\"\nwandb_run_name = \"r\"\nnetwork_dimz = 8\nv_pred_like_loss = 0.5\n"
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, flat))
    assert "3 problem(s)" in str(e.value) and "wandb_run_name" not in str(e.value)  # a no-op: accepted
    assert "'huggingface_repo_id' = 'me/x' is refused: uploading to the Hub" in str(e.value)
    assert "'v_pred_like_loss' = 0.5 is refused" in str(e.value)
    assert "unknown key 'network_dimz' (did you mean 'network.network_dim'?)" in str(e.value)


def test_existing_output_is_never_overwritten_silently(tmp_path, minimal):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "last.safetensors").write_bytes(b"earlier work")
    with pytest.raises(ConfigError, match="exists from an earlier run"):
        load_config(_write(tmp_path, minimal))
    assert load_config(_write(tmp_path, minimal), ["save.overwrite=true"]).save.overwrite


@pytest.mark.parametrize("problem", ["unknown", "type", "path"])
def test_cli_exits_2_with_one_message_before_loading(tmp_path, minimal, problem):
    text = {"unknown": minimal + "\n[sample]\nsample_every_n_step = 3\n",
            "type": minimal + "\n[optimizer]\nlearning_rate = \"fast\"\n",
            "path": minimal.replace("model.safetensors", "missing.safetensors")}[problem]
    path = _write(tmp_path, text)
    run = subprocess.run([sys.executable, str(ROOT / "train_network.py"), "--config_file", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and str(path) in errors[0]
    assert not (tmp_path / "out").exists()  # nothing ran: no resolved config was written
