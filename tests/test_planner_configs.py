"""What configs the planner takes: plans without the model, data or xformers on this machine; a config whose
family cannot be told is a config error; blocks_to_swap counts as sd-scripts counts; a fused backward pass with
an 8-bit optimizer plans."""
from __future__ import annotations

import dataclasses
import types

import pytest
import toml
import torch

import train_network
from library.config import ConfigError, NetworkSection
from library.planner import plan
from library.planner.architecture import resolve
from library.planner.step import StepSettings


def _model(name: str, **keys):
    return types.SimpleNamespace(**{"pretrained_model_name_or_path": name, "family": "auto", "arch": None,
                                    "v2": False, **keys})


@pytest.mark.parametrize("name, family, arch", [
    ("/models/flux1-dev.safetensors", "flux", "flux-dev"),
    ("black-forest-labs/FLUX.1-schnell", "flux", "flux-schnell"),
    ("/models/sd3.5_large.safetensors", "sd3", "sd3.5-large"),
    ("stabilityai/stable-diffusion-3-medium-diffusers", "sd3", "sd3-medium"),
    ("/models/sd_xl_base_1.0.safetensors", "sdxl", "sdxl"),
    ("/models/v2-1_768-ema-pruned.safetensors", "sd1", "sd2"),
    ("runwayml/stable-diffusion-v1-5", "sd1", "sd15"),
])
def test_known_names_pick_the_architecture_without_the_file(name, family, arch):
    assert resolve(_model(name)) == (family, arch)


def test_model_arch_and_family_decide_over_the_name():
    assert resolve(_model("/models/my_model.safetensors", arch="flux-schnell")) == ("flux", "flux-schnell")
    assert resolve(_model("/models/my_model.safetensors", family="sdxl")) == ("sdxl", "sdxl")
    assert resolve(_model("/models/sdxl_folder/flux1-dev.safetensors")) == ("flux", "flux-dev")  # not the folder


def test_an_unknown_missing_model_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.arch.*flux-dev.*Known names"):
        resolve(_model("/models/my_model.safetensors"))


def _flat_config(tmp_path, **keys):
    """An sd-scripts flat config naming files that are not on this machine."""
    raw = {"pretrained_model_name_or_path": str(tmp_path / "missing" / "v1-5-pruned-emaonly.safetensors"),
           "train_data_dir": str(tmp_path / "missing" / "images"), "output_dir": str(tmp_path / "out"),
           "resolution": "64,64", "network_module": "networks.lora", "network_dim": 4, "xformers": True,
           "mixed_precision": "bf16", "gradient_checkpointing": True, **keys}
    path = tmp_path / "plan.toml"
    path.write_text(toml.dumps(raw))
    return path


def test_plan_needs_no_files_and_no_xformers(tmp_path, capsys):
    path = _flat_config(tmp_path)
    assert train_network.main(["--config", str(path), "--plan"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: sd15 (sd1)" in out and "card peak" in out
    with pytest.raises(SystemExit) as e:  # training does check the files
        train_network.main(["--config", str(path)])
    assert e.value.code == 2


def test_plan_of_an_unknown_missing_model_exits_2(tmp_path, capsys):
    path = _flat_config(tmp_path, pretrained_model_name_or_path=str(tmp_path / "missing" / "my_model.safetensors"),
                        clip_l=str(tmp_path / "missing" / "clip_l.safetensors"))
    with pytest.raises(SystemExit) as exit_:  # as every user error of a recipe's main() (cli.recipe_main)
        train_network.main(["--config", str(path), "--plan"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "model.arch" in err and "flux-dev" in err and "sd15" in err


@pytest.mark.parametrize("count", [1, 2, 9, 16, 35, 38, 60])
def test_flux_blocks_to_swap_counts_as_sd_scripts(count):
    """sd-scripts (library/flux_models.py, enable_block_swap): count // 2 double blocks and
    (count - count // 2) * 2 single blocks; here more than the model has swaps all of them."""
    from diffusers import FluxTransformer2DModel

    from library.families import get_family
    from library.loading import arch_dir

    with torch.device("meta"):
        denoiser = FluxTransformer2DModel.from_config(
            FluxTransformer2DModel.load_config(str(arch_dir("flux-dev")), subfolder="transformer"))
    parts = types.SimpleNamespace(denoiser=denoiser)
    chosen = get_family("flux", "").blocks_to_swap(parts, count)
    doubles = [b for b in chosen if b in set(denoiser.transformer_blocks)]
    singles = [b for b in chosen if b in set(denoiser.single_transformer_blocks)]
    assert len(doubles) == min(count // 2, 19)
    assert len(singles) == min((count - count // 2) * 2, 38)
    order = [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]
    assert [order.index(b) for b in chosen] == sorted(order.index(b) for b in chosen)  # execution order


@pytest.fixture(scope="module")
def tiny_db(tiny_sd1):
    return StepSettings(recipe="db", family="sd1", arch=str(tiny_sd1[0]), width=64, height=64, batch_size=1,
                        mixed_precision="bf16", full_bf16=True, train_text_encoder=False, optimizer_type="AdamW8bit",
                        network=NetworkSection(network_dim=4, network_alpha=2.0))


@pytest.mark.parametrize("fused", [{"fused_optimizer_groups": 2}, {"fused_backward_pass": True}])
def test_fused_backward_with_an_8bit_optimizer_plans(tiny_db, fused):
    plain = plan(tiny_db)
    fused_plan = plan(dataclasses.replace(tiny_db, **fused))
    state = fused_plan.breakdown["optimizer state"]
    assert 0 < state == pytest.approx(plain.breakdown["optimizer state"], rel=0.01)  # the same 8-bit layout
    assert fused_plan.breakdown["gradients"] < plain.breakdown["gradients"]
