"""Adapter options as users write them (typed keys and sd-scripts / LyCORIS network_args), config
errors, block-wise ranks and learning rates, LoRA+, max-norm, bad files, and the merge command."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.config import ConfigError
from library.config_files import config_from_dict
from library.families.base import ModelSource
from library.families.sd1 import SD1Family
from networks import blockwise, files, max_norm
from networks.lycoris_format import LoraFileError
from networks.settings import NetworkSettings
from model_checks import inject_adapters, randomise_adapters, saved_sd1_adapter, sd1_probe


def _cfg(network=None, save=None):
    raw = {"model": {"pretrained_model_name_or_path": "x"}, "dataset": {"train_data_dir": "d"},
           "train": {"output_dir": "o"}, "network": network or {}, "save": save or {}}
    return config_from_dict(raw, source="t.toml", check_paths=False)


def test_lycoris_network_args_and_typed_keys_give_the_same_settings():
    a = _cfg({"network_module": "lycoris.kohya", "network_dim": 8,
              "network_args": ["algo=lokr", "factor=4", "decompose_both=True", "conv_dim=4", "conv_alpha=2",
                               "rank_dropout=0.1"]})
    b = _cfg({"network_module": "lycoris.kohya", "network_dim": 8, "algo": "lokr", "factor": 4,
              "decompose_both": True, "conv_dim": 4, "conv_alpha": 2.0, "rank_dropout": 0.1})
    sa, sb = (NetworkSettings.from_network_section(c.network) for c in (a, b))
    assert sa == sb and sa.algo == "lokr" and sa.factor == 4 and sa.decompose_both and sa.conv_dim == 4
    dora = NetworkSettings.from_network_section(_cfg({"network_args": ["dora_wd=True"]}).network)
    assert dora.algo == "dora" and dora.as_args()["dora_wd"] == "True"
    blocks = NetworkSettings.from_network_section(_cfg({"network_args": [
        "block_dims=" + ",".join(["2"] * 25), "down_lr_weight=sine+0.5", "mid_lr_weight=2"]}).network)
    assert blocks.block_dims == (2,) * 25 and blocks.down_lr_weight[0] == 0.5 and blocks.mid_lr_weight == 2.0


@pytest.mark.parametrize("network, save, message", [
    ({"algo": "lora", "network_args": ["constraint=0.1"]}, {}, "constraint"),
    ({"algo": "dora", "network_args": ["wd_on_output=True"]}, {}, "wd_on_output"),
    ({"algo": "loha", "loraplus_lr_ratio": 16.0}, {}, "LoRA+"),
    ({"algo": "loha", "dora_wd": True}, {}, "dora_wd"),
    ({"algo": "lora", "use_tucker": True}, {}, "use_tucker"),
    ({"network_args": ["algo=loha"], "algo": "lokr"}, {}, "disagree"),
    ({"network_args": ["nonsense=1"]}, {}, "nonsense"),
    ({"block_dims": [4] * 24}, {}, "25"),
    ({"down_lr_weight": "wiggly"}, {}, "down_lr_weight"),
    ({"algo": "oft", "scale_weight_norms": 1.0}, {"save_format": "peft"}, "scale_weight_norms"),
])
def test_impossible_adapter_configs_are_config_errors(network, save, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(network, save)


@pytest.fixture(scope="module")
def parts(tiny_sd1):
    return SD1Family().load(ModelSource(str(tiny_sd1[0])))


def test_block_dims_lr_weights_and_loraplus(parts):
    dims = [0] + [2] * 11 + [3] + [4] * 12  # IN00 has no layer; MID rank 3; OUT rank 4
    s = NetworkSettings(dim=8, alpha=1.0, block_dims=tuple(dims), down_lr_weight=(1.0,) * 3 + (0.0,) * 9,
                        mid_lr_weight=0.5, loraplus_unet_lr_ratio=16.0)
    adapted = inject_adapters(SD1Family(), copy.deepcopy(parts), s)
    unet, te = adapted
    ranks = {p.split(".")[0]: r for p, (r, a) in unet.layers.items()}
    assert ranks == {"down_blocks": 2, "mid_block": 3, "up_blocks": 4}
    assert not any(p.startswith("down_blocks.1.") for p in unet.layers)  # IN04-IN06: lr weight 0, left out
    assert {r for r, a in te.layers.values()} == {8}  # blocks are a U-Net notion
    groups = blockwise.param_groups(adapted, s, None, 5e-5, 1e-4)
    lrs = sorted({round(g["lr"], 10) for g in groups})
    assert lrs == [5e-5, 1e-4, 8e-4, 1.6e-3]  # text encoder / mid (x0.5) 5e-5, U-Net 1e-4, LoRA+ x16
    up = {id(layer.lora_B["default"].weight) for _, layer in unet.adapter_layers()}
    fast = [g for g in groups if g["lr"] >= 8e-4 - 1e-12]
    assert fast and all(id(p) in up for g in fast for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(len(c.parameters()) for c in adapted)


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
def test_scale_weight_norms_caps_every_delta(parts, algo):
    adapted = inject_adapters(SD1Family(), copy.deepcopy(parts), NetworkSettings(dim=4, alpha=4.0, algo=algo))
    randomise_adapters(adapted)
    norms = [float(layer.get_delta_weight("default").norm()) for c in adapted for _, layer in c.adapter_layers()]
    limit = sorted(norms)[len(norms) // 2]
    scaled, _, _ = max_norm.apply(adapted, limit)
    assert scaled == sum(n > limit for n in norms) > 0
    after = [float(layer.get_delta_weight("default").norm()) for c in adapted for _, layer in c.adapter_layers()]
    assert max(after) == pytest.approx(limit, rel=1e-4)


def test_bad_files_are_refused_naming_keys_and_nothing_loads(parts, tmp_path):
    loha_settings = NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, algo="loha")
    _, _, path = saved_sd1_adapter(parts, loha_settings, "kohya", tmp_path / "loha.safetensors")
    fresh = copy.deepcopy(parts)
    lora = inject_adapters(SD1Family(), fresh, NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0))
    with pytest.raises(LoraFileError, match="holds loha weights"):
        files.load_into(lora, str(path))
    assert all(float(layer.lora_B["default"].weight.abs().max()) == 0 for c in lora for _, layer in c.adapter_layers())
    tensors = load_file(path)
    sdxl = {k.replace("lora_te_", "lora_te1_"): v for k, v in tensors.items()}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    loha = inject_adapters(SD1Family(), copy.deepcopy(parts), loha_settings)
    with pytest.raises(LoraFileError, match="made for sdxl_base_v1-0"):
        files.load_into(loha, str(tmp_path / "sdxl.safetensors"), {"ss_base_model_version": "sd_v1"})
    with pytest.raises(LoraFileError, match="lora_te1_text_model"):
        files.load_into(loha, str(tmp_path / "sdxl.safetensors"))
    key = next(k for k in tensors if k.endswith("hada_w1_a"))
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, str(tmp_path / "shape.safetensors"))
    with pytest.raises(LoraFileError, match=key.split(".")[0] + ".hada_w1_a has shape"):
        files.load_into(loha, str(tmp_path / "shape.safetensors"))


def test_merge_command_writes_a_single_file_equal_to_the_adapter(parts, tiny_sd1, tmp_path):
    from networks.merge import main

    lokr = NetworkSettings(dim=2, alpha=1.0, conv_dim=2, conv_alpha=1.0, algo="lokr")
    live_parts, _, path = saved_sd1_adapter(parts, lokr, "kohya", tmp_path / "lokr.safetensors")
    out = tmp_path / "merged.safetensors"
    assert main(["--model", str(tiny_sd1[1]), "--tokenizer", str(tiny_sd1[0] / "tokenizer"), "--arch",
                 str(tiny_sd1[0]), "--network", str(path), "--ratio", "1.0", "--out", str(out)]) == 0
    merged = SD1Family().load(ModelSource(str(out), tokenizer=str(tiny_sd1[0] / "tokenizer"), arch=str(tiny_sd1[0])))
    for a, b in zip(sd1_probe(merged), sd1_probe(live_parts)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["merge_ratios"]) == [1.0]


@pytest.mark.parametrize("network, save", [
    ({"network_module": "lycoris.kohya", "network_args": ["algo=loha", "conv_dim=2", "conv_alpha=1"]}, {}),
    ({"algo": "oft", "scale_weight_norms": None}, {"save_format": "peft"}),
    ({"algo": "boft", "network_args": ["constraint=0.01"], "conv_dim": 4}, {}),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=dora", "conv_dim=2", "conv_alpha=1"]}, {}),
    ({"network_module": "lycoris.kohya", "network_args": ["algo=lokr", "conv_dim=2", "conv_alpha=1", "factor=4",
                                                          "use_tucker=True"]}, {}),
])
def test_train_save_continue_gives_identical_weights(make_config, network, save):
    from train_network import train

    first = train(make_config(network=network, save=save, train={"max_train_steps": 2}))
    with safe_open(str(first.adapter_path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] in ("loha", "oft", "boft", "lora", "lokr")
    again = train(make_config(network={**network, "network_weights": str(first.adapter_path)}, save=save,
                              train={"output_name": "continued", "max_train_steps": 1},
                              optimizer={"learning_rate": 0.0}))
    before, after = load_file(first.adapter_path), load_file(again.adapter_path)
    assert before.keys() == after.keys()
    for key in before:
        if "use_tucker=True" in network.get("network_args", []):  # LoKr's plain w2 refactored: float rounding
            torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(before[key], after[key]), key


def test_scale_weight_norms_reports_keys_scaled(make_config):
    from train_network import train

    result = train(make_config(network={"scale_weight_norms": 1e-4}, train={"max_train_steps": 2}))
    assert len(result.keys_scaled) == 2 and result.keys_scaled[-1] > 0


def _expected_layers(module, pattern: str, conv3: bool) -> set[str]:
    """Linear and 1x1 conv layers (and 3x3 convs with conv3) whose path matches `pattern`, found by name."""
    import re

    return {p for p, m in module.named_modules() if re.search(pattern, p) and (
        isinstance(m, torch.nn.Linear) or isinstance(m, torch.nn.Conv2d) and (conv3 or m.kernel_size == (1, 1)))}


@pytest.mark.parametrize("preset", ["full", "attn-mlp", "attn-only", "unet-transformer-only",
                                    "unet-convblock-only", "unet-only"])
def test_lycoris_presets_pick_their_layers(parts, preset):
    """LyCORIS' presets (lycoris/config.py): attn-mlp and unet-transformer-only adapt the transformer blocks and
    no 3x3 conv even with conv_dim; attn-only the attention projections only (U-Net attn1/attn2, CLIP self_attn);
    unet-convblock-only the ResNet / down / up-sampling blocks with their 3x3 convs at network_dim; the unet-*
    presets leave the text encoder alone."""
    from networks.targets import find_layers

    s = NetworkSettings.from_network_section(_cfg({"network_module": "lycoris.kohya", "network_dim": 8,
                                                   "network_args": [f"preset={preset}", "conv_dim=4"]}).network)
    unet_target, te_target = SD1Family().adapter_targets(parts)
    unet, te = parts.denoiser, parts.text_encoders[te_target.component]
    transformer = r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks)"
    convblock = r"(resnets|downsamplers|upsamplers)\.\d+\."
    expected_unet = {"full": _expected_layers(unet, transformer, False) | _expected_layers(unet, convblock, True),
                     "unet-only": _expected_layers(unet, transformer, False) | _expected_layers(unet, convblock, True),
                     "attn-mlp": _expected_layers(unet, transformer, False),
                     "unet-transformer-only": _expected_layers(unet, transformer, False),
                     "attn-only": _expected_layers(unet, r"\.attn[12]\.", False),
                     "unet-convblock-only": _expected_layers(unet, convblock, True)}[preset]
    expected_te = {"attn-only": _expected_layers(te, r"self_attn\.", False),
                   "full": _expected_layers(te, r"(self_attn|mlp)\.", False),
                   "attn-mlp": _expected_layers(te, r"(self_attn|mlp)\.", False)}.get(preset, set())
    unet_layers = find_layers(unet, unet_target, s)
    assert set(unet_layers) == expected_unet and len(expected_unet) > 10
    assert set(find_layers(te, te_target, s)) == expected_te
    assert s.adapts(te_target.component) == bool(expected_te)
    conv_ranks = {r for p, (r, a) in unet_layers.items() if ".conv1" in p or ".conv2" in p}
    assert conv_ranks == {"full": {4}, "unet-only": {4}, "unet-convblock-only": {4}}.get(preset, set())
    assert s.as_args().get("preset") == (None if preset == "full" else preset)


def test_preset_is_read_by_lycoris_only_and_checked():
    s = NetworkSettings.from_network_section(_cfg({"network_args": ["preset=attn-only"]}).network)
    assert s.preset == "full"  # sd-scripts' networks.lora does not read preset
    with pytest.raises(ConfigError, match="'preset' = 'my.toml' is not one of"):
        _cfg({"network_module": "lycoris.kohya", "network_args": ["preset=my.toml"]})
