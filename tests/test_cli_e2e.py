"""The command line as a user runs it, in a subprocess: accelerate launch with a flat sd-scripts TOML
on a single-file checkpoint, and the quickstart script on a fresh folder."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from safetensors import safe_open

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_accelerate_launch_with_flat_sd_scripts_toml_on_a_single_file(tiny_sd1, tiny_data, tmp_path):
    folder, single = tiny_sd1
    config = tmp_path / "sd_scripts.toml"
    config.write_text(textwrap.dedent(f"""
        [model_arguments]
        pretrained_model_name_or_path = "{single}"
        tokenizer = "{folder / 'tokenizer'}"
        arch = "{folder}"
        [additional_network_arguments]
        network_module = "networks.lora"
        network_dim = 4
        network_alpha = 4
        network_args = ["conv_dim=2", "conv_alpha=1"]
        [dataset_arguments]
        train_data_dir = "{tiny_data}"
        resolution = "64,64"
        caption_extension = ".txt"
        [training_arguments]
        output_dir = "{tmp_path / 'out'}"
        output_name = "flat"
        train_batch_size = 2
        max_train_steps = 3
        optimizer_type = "AdamW"
        learning_rate = 0.001
        save_model_as = "safetensors"
        save_precision = "fp16"
        seed = 1
    """))
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
                          str(ROOT / "train_network.py"), "--config_file", str(config),
                          "--set", "train.max_train_steps=4"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 4/4" in run.stdout
    with safe_open(tmp_path / "out" / "flat.safetensors", "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}  # save_precision
        assert f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight").shape == (2, 32, 3, 3)
        assert f.metadata()["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "1.0"}'
    resolved = (tmp_path / "out" / "flat-config.toml").read_text()
    assert "max_train_steps = 4" in resolved and "[network]" in resolved


def test_quickstart_script_from_nothing(tmp_path):
    env = {**os.environ, "QUICKSTART_DIR": str(tmp_path / "qs")}
    run = subprocess.run(["bash", str(ROOT / "quickstart.sh"), "--set", "train.max_train_steps=20"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "qs" / "output"
    assert (out / "tiny-lora.safetensors").is_file() and (out / "tiny-lora-config.toml").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "tiny-lora_step00000020_00_1234.png", "tiny-lora_step00000020_01_1235.png", "tiny-lora_step00000020_grid.png"]
    line = next(x for x in run.stdout.splitlines() if x.startswith("denoising loss"))
    base, trained = (float(w) for w in line.replace("->", " ").split() if w[0].isdigit())
    assert trained < base
