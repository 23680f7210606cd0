"""The LoRA tools as users run them: `python -m networks.resize` (the retained energy it reports is what the
resized file, applied as UIs apply it, keeps), `python -m networks.extract` (from base and base + a merged LoRA,
a LoRA whose merge gives the fine-tune back at full rank, in every family) and `python -m networks.convert`."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.families.base import ModelSource
from library.families.flux import FluxFamily
from library.families.sd1 import SD1Family
from library.families.sd3 import Sd3Family
from library.families.sdxl import SDXLFamily
from model_checks import inject_adapters, randomise_adapters
from networks import convert, extract, files, resize
from networks.merge import merge_file
from networks.settings import settings_from


def _where(family_name, request):
    """(family, single-file path, the separate files / arch / tokenizer options both models need)."""
    if family_name in ("sd1", "sdxl"):
        folder, single = request.getfixturevalue("tiny_sd1" if family_name == "sd1" else "tiny_sdxl")
        family = SD1Family() if family_name == "sd1" else SDXLFamily()
        return family, single, {"tokenizer": str(folder), "arch": str(folder)}
    files_ = request.getfixturevalue("tiny_sd3" if family_name == "sd3" else "tiny_flux")
    where = {"tokenizer": str(files_["folder"]), "arch": str(files_["folder"]), "t5xxl": str(files_["t5xxl"])}
    if family_name == "sd3":
        return Sd3Family(), files_["single"], where
    return FluxFamily(), files_["transformer"], {**where, "clip_l": str(files_["clip_l"]), "ae": str(files_["ae"])}


def _kohya_deltas(tensors):
    """layer -> (alpha / rank) up @ down from a kohya file (sd-scripts / ComfyUI's LoRA formula), float64."""
    out = {}
    for name in {k.split(".")[0] for k in tensors}:
        down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else down.shape[0]
        out[name] = alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))
    return out


@pytest.mark.parametrize("family_name", ["sd1", "sdxl", "sd3", "flux"])
def test_extract_from_base_and_merged_lora_gives_the_fine_tune_back(family_name, request, tmp_path):
    family, single, where = _where(family_name, request)
    base = family.load(ModelSource(str(single), **where))
    conv = family_name in ("sd1", "sdxl")
    options = {"dim": 4, "alpha": 2.0, **({"conv_dim": 2, "conv_alpha": 1.0} if conv else {})}
    settings = settings_from({"module": "networks.lora", **options})
    trained = copy.deepcopy(base)
    components = {"denoiser"} if family_name == "flux" else {"denoiser", "te", "te1", "te2"}  # FLUX: clip_l shared
    adapted = inject_adapters(family, trained, settings, components)
    randomise_adapters(adapted, relative=0.2)
    lora_file = tmp_path / "lora.safetensors"
    files.save(lora_file, files.adapter_tensors(adapted, "kohya", torch.float32)[0], {})
    tuned = copy.deepcopy(base)
    merge_file({"denoiser": tuned.denoiser, **tuned.text_encoders}, family.adapter_targets(tuned), str(lora_file), 1.0)
    tuned_file = tmp_path / "tuned.safetensors"
    files.save(tuned_file, {k: v.contiguous() for k, v in family.single_file_state_dict(tuned).items()}, {})

    out = tmp_path / "extracted.safetensors"
    args = ["--model_org", str(single), "--model_tuned", str(tuned_file), "--dim", "4", "--out", str(out)]
    args += ["--conv_dim", "2"] if conv else []
    assert extract.main(args + [arg for k, v in where.items() for arg in (f"--{k}", v)]) == 0
    extracted = load_file(out)
    prefixes = {"sd1": {"unet", "te"}, "sdxl": {"unet", "te1", "te2"}, "sd3": {"unet", "transformer", "te1", "te2"}}  # SD3: its last norm1_context
    assert {k.split("_")[1] for k in extracted} == prefixes.get(family_name, {"unet"})
    again = copy.deepcopy(base)
    modules = {"denoiser": again.denoiser, **again.text_encoders}
    merge_file(modules, family.adapter_targets(again), str(out), 1.0)
    wanted = {"denoiser": tuned.denoiser, **tuned.text_encoders}
    worst, changed = 0.0, 0
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            difference = (value.double() - wanted[name].state_dict()[key].double()).abs().max()
            worst = max(worst, float(difference))
            changed += bool((wanted[name].state_dict()[key] != base_state(base, name)[key]).any())
    assert worst < 1e-4 and changed > 20


def base_state(parts, name):
    return (parts.denoiser if name == "denoiser" else parts.text_encoders[name]).state_dict()


@pytest.fixture(scope="module")
def sd1_parts(tiny_sd1):
    return SD1Family().load(ModelSource(str(tiny_sd1[0])))


@pytest.fixture(scope="module")
def flux_parts(tiny_flux):
    return FluxFamily().load(ModelSource(str(tiny_flux["folder"]), t5xxl_max_token_length=16))


def _trained_file(parts, tmp_path, family=SD1Family(), **options):
    settings = settings_from({"module": "networks.lora", "dim": 8, "alpha": 4.0, **options})
    adapted = inject_adapters(family, copy.deepcopy(parts), settings, {"denoiser", "te", "te1", "te2"})
    randomise_adapters(adapted, relative=0.2)
    path = tmp_path / "rank8.safetensors"
    tensors, _ = files.adapter_tensors(adapted, "kohya", torch.float32)
    files.save(path, tensors, {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_network_module": "networks.lora",
                               "ss_network_args": json.dumps(settings.as_args())})
    return path, adapted, settings


@pytest.mark.parametrize("family_name, method", [("sd1", None), ("sd1", "sv_fro"), ("sd1", "sv_ratio"),
                                                 ("flux", None)])
def test_resize_keeps_the_energy_it_reports(family_name, method, request, tmp_path, capsys):
    if family_name == "flux":  # fused qkv layers (block-diagonal up) resized as one
        path, _, _ = _trained_file(request.getfixturevalue("flux_parts"), tmp_path, FluxFamily())
    else:
        path, _, _ = _trained_file(request.getfixturevalue("sd1_parts"), tmp_path, conv_dim=4, conv_alpha=1.0)
    out = tmp_path / "resized.safetensors"
    args = ["--model", str(path), "--new_rank", "3", "--out", str(out)]
    args += ["--dynamic_method", method, "--dynamic_param", "0.9" if method == "sv_fro" else "4"] if method else []
    assert resize.main(args) == 0
    with safe_open(str(out), "pt") as f:
        reported = json.loads(f.metadata()["lt_resize"])["retained"]
    assert f"Frobenius retained overall {reported:.6f}" in capsys.readouterr().out
    before, after = _kohya_deltas(load_file(path)), _kohya_deltas(load_file(out))
    assert before.keys() == after.keys() and len(before) > (100 if family_name == "sd1" else 30)
    kept = total = 0.0
    for name, d in before.items():
        k = after[name]
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        rank = int(torch.linalg.matrix_rank(after[name]))
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # Eckart-Young: the truncated SVD is what must be kept
        torch.testing.assert_close(after[name], best, rtol=1e-4, atol=1e-6)
        assert rank <= 3
        if method == "sv_fro":  # the smallest rank (at most 3) keeping 90 % of the norm
            assert rank == 3 or k.norm() / d.norm() >= 0.9 - 1e-9
            assert rank == 1 or s[:rank - 1].norm() / s.norm() < 0.9
        kept, total = kept + float(k.norm() ** 2), total + float(d.norm() ** 2)
    assert (kept / total) ** 0.5 == pytest.approx(reported, rel=1e-6)
    assert 0.3 < reported < 1.0


def test_resize_refuses_other_algorithms_naming_the_key(sd1_parts, tmp_path, capsys):
    settings = settings_from({"module": "lycoris.kohya", "algo": "loha", "dim": 4, "alpha": 1.0})
    adapted = inject_adapters(SD1Family(), copy.deepcopy(sd1_parts), settings, {"denoiser"})
    path = tmp_path / "loha.safetensors"
    files.save(path, files.adapter_tensors(adapted, "kohya", torch.float32)[0], {})
    assert resize.main(["--model", str(path), "--new_rank", "2", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hada_w1_a" in err[0] and err[0].startswith("resize error:")


@pytest.mark.parametrize("family_name", ["sd1", "flux"])
def test_convert_kohya_to_peft_and_back(family_name, request, tmp_path):
    if family_name == "flux":  # fused qkv layers split into their parts and joined back
        folder = request.getfixturevalue("tiny_flux")["folder"]
        path, adapted, settings = _trained_file(request.getfixturevalue("flux_parts"), tmp_path, FluxFamily())
    else:
        folder = request.getfixturevalue("tiny_sd1")[0]
        path, adapted, settings = _trained_file(request.getfixturevalue("sd1_parts"), tmp_path)
    peft_path, back = tmp_path / "peft.safetensors", tmp_path / "back.safetensors"
    model = ["--model", str(folder)]
    assert convert.main(model + ["--network", str(path), "--to", "peft", "--out", str(peft_path)]) == 0
    peft_keys = set(load_file(peft_path))
    assert peft_keys == set(files.adapter_tensors(adapted, "peft", torch.float32)[0])
    assert convert.main(model + ["--network", str(peft_path), "--to", "kohya", "--out", str(back)]) == 0
    original, returned = load_file(path), load_file(back)
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)
