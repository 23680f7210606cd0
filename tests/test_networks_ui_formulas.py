"""What UIs make of our kohya files, in all four families and for every algorithm (LoRA, LoCon, LoHa, LoKr, DoRA,
OFT, BOFT): each layer's patched weight rebuilt from the saved file alone with the formula ComfyUI applies
(comfy/weight_adapter/base.py weight_decompose, lora.py, loha.py, lokr.py, oft.py, boft.py; Forge vendors the
same functions), written here from their published source, equals the weight our merge writes and the weight
of the live adapter (merged).

Where ComfyUI patches a layer differently from the module it belongs to here, the test does what ComfyUI
does: SD3's last context modulation is patched in the checkpoint's row order (its key map hands the diff
through a function that swaps the (shift, scale) halves, and the dora_scale is applied in that order); a part
of a fused weight (FLUX / SD3 q, k, v) is patched on its slice of rows, which is the part's own weight."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from library.families.base import ModelSource
from library.families.flux import FluxFamily
from library.families.sd1 import SD1Family
from library.families.sd3 import Sd3Family
from library.families.sdxl import SDXLFamily
from model_checks import comfy_oft, inject_adapters, randomise_adapters
from networks import files, lycoris_format
from networks.merge import merge_file
from networks.settings import settings_from

EPS = torch.finfo(torch.float32).eps
FAMILIES = {"sd1": SD1Family, "sdxl": SDXLFamily, "sd3": Sd3Family, "flux": FluxFamily}
CASES = {  # id -> network options (conv options only where the family has 3x3 convs in adapted blocks)
    "lora": {"module": "networks.lora", "dim": 4, "alpha": 2.0},
    "locon": {"algo": "locon", "dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
    "loha_tucker": {"algo": "loha", "dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0, "use_tucker": True},
    "dora": {"algo": "dora", "dim": 4, "alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0},
    "lokr_tucker_both": {"algo": "lokr", "dim": 2, "alpha": 1.0, "conv_dim": 2, "conv_alpha": 1.0, "factor": 4,
                         "decompose_both": True, "use_tucker": True},
    "lokr_tucker": {"algo": "lokr", "dim": 2, "alpha": 1.0, "conv_dim": 2, "conv_alpha": 1.0, "factor": 4,
                    "use_tucker": True},
    "oft_constraint": {"algo": "oft", "dim": 4, "alpha": 1.0, "conv_dim": 8, "conv_alpha": 1.0, "constraint": 0.05},
    "boft": {"algo": "boft", "dim": 4, "alpha": 1.0, "conv_dim": 4, "conv_alpha": 1.0},
}


def _source(family: str, request) -> ModelSource:
    if family == "sd1":
        return ModelSource(str(request.getfixturevalue("tiny_sd1")[0]))
    if family == "sdxl":
        return ModelSource(str(request.getfixturevalue("tiny_sdxl")[0]))
    fixture = request.getfixturevalue("tiny_sd3" if family == "sd3" else "tiny_flux")
    return ModelSource(str(fixture["folder"]), t5xxl_max_token_length=16)


# ---- ComfyUI's formulas, from the file's tensors -------------------------------------------------------------


def comfy_weight_decompose(dora_scale, weight, diff):
    """weight_decompose at strength 1 (diff already times alpha and through the key map's function)."""
    calc = weight + diff
    if dora_scale.shape[0] == weight.shape[0]:  # ComfyUI: the un-adapted weight's rows
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    return calc * (dora_scale / (norm + EPS))


def comfy_lora_diff(t, shape):
    """LoRAAdapter.calculate_weight: (alpha / rank) * up @ down, reshaped to the weight."""
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    alpha = float(t["alpha"]) / down.shape[0] if "alpha" in t else 1.0
    return alpha * (up.flatten(1) @ down.flatten(1)).reshape(shape)


def comfy_loha_diff(t, shape):
    """LoHaAdapter.calculate_weight: (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), Tucker (CP) with t1, t2."""
    def factor(a, b, core):
        if core in t:
            return torch.einsum("i j k l, j r, i p -> p r k l", t[core], t[b], t[a])
        return t[a] @ t[b]
    alpha = float(t["alpha"]) / t["hada_w1_b"].shape[0] if "alpha" in t else 1.0
    m1, m2 = factor("hada_w1_a", "hada_w1_b", "hada_t1"), factor("hada_w2_a", "hada_w2_b", "hada_t2")
    return alpha * (m1 * m2).reshape(shape)


def comfy_lokr_diff(t, shape):
    """LoKrAdapter.calculate_weight, including torch.kron on the einsum's output as ComfyUI calls it (a
    non-contiguous Tucker product there raises 'view size is not compatible', and ComfyUI skips the layer)."""
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim = t["lokr_w2_b"].shape[0]
        if "lokr_t2" in t:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    alpha = float(t["alpha"]) / dim if "alpha" in t and dim is not None else 1.0
    return alpha * torch.kron(w1, w2).reshape(shape)


def comfy_patched(t, weight, function):
    """The weight ComfyUI patches from one file layer's tensors `t` (float64), in the checkpoint's order."""
    if "oft_blocks" in t:
        return weight + function(comfy_oft(t["oft_blocks"], float(t["alpha"]), weight) - weight)
    if "lora_up.weight" in t:
        diff = comfy_lora_diff(t, weight.shape)
    elif "hada_w1_a" in t:
        diff = comfy_loha_diff(t, weight.shape)
    elif any(k.startswith("lokr_") for k in t):
        diff = comfy_lokr_diff(t, weight.shape)
    else:
        raise AssertionError(f"no ComfyUI formula in this test for {sorted(t)}")
    if "dora_scale" in t:
        return comfy_weight_decompose(t["dora_scale"], weight, function(diff))
    return weight + function(diff)


def swap_halves(x):
    """ComfyUI's swap_scale_shift: the key map's function for SD3's last context modulation."""
    shift, scale = x.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


# ---- the model, trained-looking adapters, the file ----------------------------------------------------------


def _checkpoint_order(family_name, component, path):
    """ComfyUI's key-map function for the layer (identity but for SD3's last context modulation)."""
    target = component.target
    swapped = (family_name == "sd3" and component.target.component == "denoiser"
               and path.endswith("norm1_context.linear") and target.kohya_layout(path) is None)
    return (swap_halves, swap_halves) if swapped else (lambda x: x, lambda x: x)


def _live_merged(layer) -> torch.Tensor:
    layer.merge()
    merged = layer.get_base_layer().weight.detach().double().clone()
    layer.unmerge()
    return merged


@pytest.mark.parametrize("family_name", list(FAMILIES))
@pytest.mark.parametrize("case", list(CASES))
def test_comfyui_formula_equals_our_merge_and_the_live_adapter(family_name, case, request, tmp_path):
    family = FAMILIES[family_name]()
    base = family.load(_source(family_name, request))
    parts = copy.deepcopy(base)
    settings = settings_from({"module": "lycoris.kohya", **CASES[case]})
    adapted = inject_adapters(family, parts, settings)
    randomise_adapters(adapted, relative=0.2)
    tensors, _ = files.adapter_tensors(adapted, "kohya", torch.float32)
    path = tmp_path / "adapter.safetensors"
    files.save(path, tensors, {})
    file = load_file(path)

    merged = copy.deepcopy(base)
    modules = {"denoiser": merged.denoiser, **merged.text_encoders}
    assert merge_file(modules, family.adapter_targets(merged), str(path), 1.0) > 0

    checked = tucker = swapped = fused = 0
    seen = set()
    for component in adapted:
        layers, merged_module = dict(component.adapter_layers()), modules[component.target.component]
        for name, paths in lycoris_format.layers_to_save(component):  # a fused layer: its parts' rows stacked
            t = {k[len(name) + 1:]: v.double() for k, v in file.items() if k.startswith(name + ".")}
            seen.add(name)
            to_checkpoint, back = _checkpoint_order(family_name, component, paths[0])
            weight = torch.cat([layers[p].get_base_layer().weight.detach().double() for p in paths])
            ui = back(comfy_patched(t, to_checkpoint(weight), to_checkpoint))
            assert (ui - weight).abs().max() > 1e-4, name
            live = torch.cat([_live_merged(layers[p]) for p in paths])
            torch.testing.assert_close(ui, live, rtol=1e-5, atol=1e-6, msg=f"live {name}")
            ours = torch.cat([merged_module.get_submodule(p).weight.detach().double() for p in paths])
            torch.testing.assert_close(ui, ours, rtol=1e-5, atol=1e-6, msg=f"merge {name}")
            checked += len(paths)
            fused += len(paths) > 1
            tucker += weight.dim() == 4 and weight.shape[-1] == 3
            swapped += to_checkpoint is swap_halves
    assert checked == sum(len(c.layers) for c in adapted)
    assert seen == {k.split(".")[0] for k in file}  # every key of the file is a layer ComfyUI patches
    rotation = settings.algo in ("oft", "boft")  # no exact rotation of a row-reordered layer: left out
    assert swapped == (1 if family_name == "sd3" and not rotation else 0)
    if rotation:
        alphas = [t for k, t in file.items() if k.endswith(".alpha")]
        assert len(alphas) == checked and all(a.dim() == 0 and float(a) == pytest.approx(settings.constraint)
                                              for a in alphas)
    if family_name in ("sd1", "sdxl") and settings.conv_dim:
        assert tucker > 0  # 3x3 convs were adapted
    assert (fused > 0) == (family_name in ("sd3", "flux") and settings.algo in ("lora", "locon"))
