"""Every adapter algorithm on the tiny SD1 model: the delta our saved file describes, rebuilt from the
file alone by the algorithm's published formula (written here, independent of networks/), equals
what peft applies; save -> load gives identical outputs; merge at ratio 1 equals the live adapter."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from library.families.base import ModelSource
from library.families.sd1 import SD1Family, kohya_block_index
from model_checks import comfy_oft, inject_adapters, saved_sd1_adapter, sd1_probe
from networks import files
from networks.merge import merge_file
from networks.settings import NetworkSettings

CASES = {  # id -> (settings, save_format)
    "lora": (NetworkSettings(dim=4, alpha=2.0), "kohya"),
    "locon": (NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, algo="locon"), "kohya"),
    "dora": (NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, algo="dora"), "kohya"),
    "loha": (NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, algo="loha"), "kohya"),
    "loha_tucker": (NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0, algo="loha", use_tucker=True),
                    "kohya"),
    "lokr": (NetworkSettings(dim=2, alpha=1.0, conv_dim=2, conv_alpha=1.0, algo="lokr"), "kohya"),
    "lokr_both_tucker": (NetworkSettings(dim=2, alpha=1.0, conv_dim=2, conv_alpha=1.0, algo="lokr", factor=4,
                                         decompose_both=True, use_tucker=True), "kohya"),
    "oft": (NetworkSettings(dim=4, algo="oft"), "kohya"),
    "oft_conv_constraint": (NetworkSettings(dim=4, algo="oft", conv_dim=8, conv_alpha=1.0, constraint=0.05), "kohya"),
    "boft": (NetworkSettings(dim=4, algo="boft"), "kohya"),
    "boft_conv": (NetworkSettings(dim=4, algo="boft", conv_dim=4, conv_alpha=1.0), "kohya"),
    "oft_peft_layout": (NetworkSettings(dim=4, algo="oft"), "peft"),
    "lora_peft_layout": (NetworkSettings(dim=4, alpha=2.0, conv_dim=2, conv_alpha=1.0), "peft"),
}


@pytest.fixture(scope="module")
def base_parts(tiny_sd1):
    return SD1Family().load(ModelSource(str(tiny_sd1[0])))


def _trained(base_parts, case, tmp_path):
    return saved_sd1_adapter(base_parts, *CASES[case], tmp_path / f"{case}.safetensors")


# ---- the published formulas, from the file's tensors alone ------------------------------------------


def formula_delta(file: dict, name: str, weight: torch.Tensor) -> torch.Tensor:
    """W' - W for the layer `name` (kohya name or peft-layout prefix) of base weight `weight`."""
    t = {k[len(name) + 1:]: v.double() for k, v in file.items() if k.startswith(name + ".")}
    W, shape = weight.double(), weight.shape
    if "lora_A.weight" in t:  # peft layout LoRA: alpha from the metadata, here the test's own number
        t = {"lora_down.weight": t["lora_A.weight"], "lora_up.weight": t["lora_B.weight"]}
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        alpha = float(t["alpha"]) if "alpha" in t else 2.0 if down.shape[0] == 4 else 1.0
        delta = alpha / down.shape[0] * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)
        if "dora_scale" not in t:
            return delta
        return comfyui_weight_decompose(t["dora_scale"], W, delta) - W
    if "hada_w1_a" in t:
        def hada(a, b, c):
            if c in t:  # Tucker core (r, r, kh, kw), a: (r, out), b: (r, in)
                return torch.einsum("xykl,xo,yi->oikl", t[c], t[a], t[b])
            return (t[a] @ t[b]).reshape(shape)
        w = hada("hada_w1_a", "hada_w1_b", "hada_t1") * hada("hada_w2_a", "hada_w2_b", "hada_t2")
        return float(t["alpha"]) / t["hada_w1_b"].shape[0] * w
    if "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("xykl,xo,yi->oikl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        ranks = [t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t]
        scale = float(t["alpha"]) / ranks[0] if ranks else 1.0  # LyCORIS: no factor, no alpha
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:]) if w2.dim() == 2 else w2
            w1 = w1[:, :, None, None]
        return scale * torch.kron(w1, w2.contiguous()).reshape(shape)
    if "oft_blocks" in t:  # ComfyUI's OFTAdapter (3-d blocks) / BOFTAdapter (4-d), at strength 1
        return comfy_oft(t["oft_blocks"], float(t["alpha"]) if "alpha" in t else 0.0, W) - W
    raise AssertionError(f"no formula for {sorted(t)}")


def comfyui_weight_decompose(dora_scale, weight, diff):
    """ComfyUI's comfy/weight_adapter/base.py weight_decompose at strength 1: an (out, ...) dora_scale divides
    by the norm of the un-adapted weight's rows, any other by the adapted weight's input columns; + eps."""
    calc = weight + diff
    if dora_scale.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    return calc * (dora_scale / (norm + torch.finfo(torch.float32).eps))


def _peft_delta(layer) -> torch.Tensor:
    base = layer.get_base_layer()
    before = base.weight.detach().double().clone()
    layer.merge()
    delta = base.weight.detach().double() - before
    layer.unmerge()
    return delta


@pytest.mark.parametrize("case", list(CASES))
def test_file_delta_by_formula_equals_peft_delta(base_parts, case, tmp_path):
    settings, fmt = CASES[case]
    parts, adapted, path = _trained(base_parts, case, tmp_path)
    file = load_file(path)
    checked = 0
    for c in adapted:
        for module_path, layer in c.adapter_layers():
            name = (f"{c.target.diffusers_prefix}.{c.target.kohya_path_prefix}{module_path}" if fmt == "peft" else
                    f"{c.target.kohya_prefix}_{(c.target.kohya_path_prefix + module_path).replace('.', '_')}")
            expected = formula_delta(file, name, layer.get_base_layer().weight.detach())
            assert expected.abs().max() > 0, name
            torch.testing.assert_close(expected, _peft_delta(layer), rtol=1e-5, atol=1e-6, msg=name)
            checked += 1
    assert checked == sum(len(c.layers) for c in adapted) > 100


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_gives_identical_outputs_and_merge_matches(base_parts, case, tmp_path):
    settings, _ = CASES[case]
    parts, adapted, path = _trained(base_parts, case, tmp_path)
    live = sd1_probe(parts)
    fresh = copy.deepcopy(base_parts)
    loaded = files.load_into(inject_adapters(SD1Family(), fresh, settings), str(path),
                             {"ss_base_model_version": "sd_v1"})
    assert loaded == sum(len(c.layers) for c in adapted)
    for a, b in zip(sd1_probe(fresh), live):
        if settings.algo == "lokr" and settings.use_tucker:  # the file's plain w2 refactored (networks/tucker.py)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)
    merged = copy.deepcopy(base_parts)
    family = SD1Family()
    merge_file({"denoiser": merged.denoiser, "te": merged.text_encoders["te"]}, family.adapter_targets(merged),
               str(path), 1.0)
    assert not any("lora" in type(m).__name__.lower() for m in merged.denoiser.modules())
    for a, b, base in zip(sd1_probe(merged), live, sd1_probe(base_parts)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert (a - base).abs().max() > 1e-3


def test_kohya_block_index_follows_sd_scripts():
    assert kohya_block_index("down_blocks.0.attentions.0.proj_in") == 1
    assert kohya_block_index("down_blocks.0.downsamplers.0.conv") == 3
    assert kohya_block_index("down_blocks.3.resnets.1.conv1") == 11
    assert kohya_block_index("mid_block.attentions.0.proj_out") == 12
    assert kohya_block_index("up_blocks.0.resnets.0.conv1") == 13
    assert kohya_block_index("up_blocks.3.attentions.2.proj_out") == 24
    assert kohya_block_index("conv_in") is None


COMFY_CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                     "self_attn.out_proj")  # comfy/lora.py LORA_CLIP_MAP


def test_peft_layout_text_encoder_keys_are_in_comfyui_key_map(base_parts, tmp_path):
    """ComfyUI maps diffusers-style CLIP LoRA keys as text_encoder.text_model.encoder.layers.{b}.{c}
    (model_lora_keys_clip); every text-encoder layer of a peft-layout file must be one of those names,
    and a file without the segment (written before) still loads."""
    parts, adapted, path = _trained(base_parts, "lora_peft_layout", tmp_path)
    layers = {k.rsplit(".", 2)[0] for k in load_file(path) if k.startswith("text_encoder.")}
    comfy = {f"text_encoder.text_model.encoder.layers.{b}.{c}" for b in range(32) for c in COMFY_CLIP_LAYERS}
    assert layers and layers <= comfy
    assert len(layers) == len(adapted[[c.target.component for c in adapted].index("te")].layers)
    old = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in load_file(path).items()}
    old_path = tmp_path / "old.safetensors"
    files.save(old_path, old, files.read(path)[1])
    fresh = copy.deepcopy(base_parts)
    files.load_into(inject_adapters(SD1Family(), fresh, CASES["lora_peft_layout"][0]), str(old_path))
    for a, b in zip(sd1_probe(fresh), sd1_probe(parts)):
        assert torch.equal(a, b)
