"""`python -m networks.merge` on single files: several adapters at once with their ratios, FLUX with its separate
clip_l / t5xxl / ae files (the merged CLIP-L written beside the transformer), SDXL with OFT (kohya) and BOFT
(peft layout) files. The merged files, loaded back as a UI would load them, hold the weights the formulas give
from the adapter files (LoRA / LoKr: W + sum ratio_i * delta_i; rotations: T2 T1 W, ComfyUI's formula)."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from library.families.base import ModelSource
from library.families.flux import FluxFamily
from library.families.sdxl import SDXLFamily
from networks import files
from networks.merge import main
from networks.settings import settings_from
from model_checks import comfy_oft, inject_adapters, randomise_adapters


def _save(adapted, path, settings, fmt="kohya"):
    tensors, extra = files.adapter_tensors(adapted, fmt, torch.float32)
    meta = files.metadata({}, files.network_metadata(settings), {
        "started_at": 0, "output_name": "t", "learning_rate": 1e-4, "unet_lr": None, "text_encoder_lr": None,
        "steps": 1, "epoch": 1, "max_train_steps": 1, "seed": 1, "mixed_precision": "no", "clip_skip": 1,
        "num_images": 1, "resolution": [64, 64], "tag_frequency": {}, "prediction_type": "epsilon"})
    files.save(path, tensors, {**meta, **extra})


def _deltas(adapted) -> dict[tuple[str, str], torch.Tensor]:
    """(component, module path) -> the live adapter's weight delta (peft's merge)."""
    out = {}
    for c in adapted:
        for path, layer in c.adapter_layers():
            before = layer.get_base_layer().weight.detach().double().clone()
            layer.merge()
            out[c.target.component, path] = layer.get_base_layer().weight.detach().double() - before
            layer.unmerge()
    return out


def _flux_source(files_, transformer, clip_l):
    return ModelSource(str(transformer), clip_l=str(clip_l), t5xxl=str(files_["t5xxl"]), ae=str(files_["ae"]),
                       arch=str(files_["folder"]), tokenizer=str(files_["folder"]), t5xxl_max_token_length=16)


def test_flux_single_file_two_adapters_with_ratios(tiny_flux, tmp_path):
    family = FluxFamily()
    base = family.load(_flux_source(tiny_flux, tiny_flux["transformer"], tiny_flux["clip_l"]))
    expected = {}
    paths = []
    for seed, options in enumerate(({"dim": 4, "alpha": 2.0}, {"algo": "lokr", "dim": 2, "alpha": 1.0, "factor": 4})):
        settings = settings_from({"module": "lycoris.kohya" if "algo" in options else "networks.lora", **options})
        adapted = inject_adapters(family, copy.deepcopy(base), settings)
        randomise_adapters(adapted, seed, relative=0.2)
        paths.append(tmp_path / f"adapter{seed}.safetensors")
        _save(adapted, paths[-1], settings)
        for key, delta in _deltas(adapted).items():
            expected[key] = expected.get(key, 0) + (0.5, 0.8)[seed] * delta
    out = tmp_path / "merged.safetensors"
    assert main(["--model", str(tiny_flux["transformer"]), "--clip_l", str(tiny_flux["clip_l"]), "--t5xxl",
                 str(tiny_flux["t5xxl"]), "--ae", str(tiny_flux["ae"]), "--arch", str(tiny_flux["folder"]),
                 "--tokenizer", str(tiny_flux["folder"]), "--network", *map(str, paths),
                 "--ratio", "0.5", "0.8", "--out", str(out)]) == 0
    clip_file = tmp_path / "merged_clip_l.safetensors"
    assert all(k.startswith("text_model.") for k in load_file(clip_file))  # ComfyUI's clip_l layout
    merged = family.load(_flux_source(tiny_flux, out, clip_file))
    modules = {"denoiser": merged.denoiser, **merged.text_encoders}
    originals = {"denoiser": base.denoiser, **base.text_encoders}
    assert {c for c, _ in expected} == {"denoiser", "te1"}
    for (component, path), delta in expected.items():
        before = originals[component].get_submodule(path).weight.detach().double()
        after = modules[component].get_submodule(path).weight.detach().double()
        assert delta.abs().max() > 1e-4
        torch.testing.assert_close(after, before + delta, rtol=1e-5, atol=1e-6, msg=f"{component} {path}")


def test_sdxl_single_file_oft_and_boft_files(tiny_sdxl, tmp_path):
    folder, single = tiny_sdxl
    family = SDXLFamily()
    source = ModelSource(str(single), tokenizer=str(folder), arch=str(folder))
    base = family.load(source)
    runs = []
    for seed, (options, fmt) in enumerate((({"algo": "oft", "dim": 4, "constraint": 0.05}, "kohya"),
                                           ({"algo": "boft", "dim": 4}, "peft"))):
        settings = settings_from({"module": "lycoris.kohya", "alpha": 1.0, **options})
        adapted = inject_adapters(family, copy.deepcopy(base), settings)
        randomise_adapters(adapted, seed, relative=0.2)
        path = tmp_path / f"{options['algo']}.safetensors"
        _save(adapted, path, settings, fmt)
        runs.append((adapted, path, settings.constraint))
    out = tmp_path / "merged.safetensors"
    assert main(["--model", str(single), "--tokenizer", str(folder), "--arch", str(folder),
                 "--network", str(runs[0][1]), str(runs[1][1]), "--out", str(out)]) == 0
    merged = family.load(ModelSource(str(out), tokenizer=str(folder), arch=str(folder)))
    modules = {"denoiser": merged.denoiser, **merged.text_encoders}
    checked = 0
    for component in runs[0][0]:
        name = component.target.component
        for path, layer in component.adapter_layers():
            weight = layer.get_base_layer().weight.detach().double()
            for adapted, _, constraint in runs:
                rotation = dict(next(c for c in adapted if c.target.component == name).adapter_layers())[path]
                weight = comfy_oft(rotation.oft_blocks["default"].detach().double(), constraint, weight)
            after = modules[name].get_submodule(path).weight.detach().double()
            torch.testing.assert_close(after, weight, rtol=1e-5, atol=1e-6, msg=f"{name} {path}")
            checked += 1
    assert checked == sum(len(c.layers) for c in runs[0][0]) > 50


def test_bad_input_exits_2_with_one_line(tiny_flux, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    adapter = tmp_path / "a.safetensors"
    files.save(adapter, {"lora_unet_x.alpha": torch.tensor(1.0)}, {})
    assert main(["--model", str(tiny_flux["transformer"]), "--arch", str(tiny_flux["folder"]),
                 "--network", str(adapter), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and [l for l in err.splitlines() if "error" in l][-1].count("model.clip_l") == 1
    assert main(["--model", str(tiny_flux["folder"]), "--network", str(tmp_path / "missing.safetensors"),
                 "--out", out]) == 2
    assert capsys.readouterr().err.strip() == f"merge error: {tmp_path / 'missing.safetensors'}: no such adapter file"
    with pytest.raises(SystemExit) as e:
        main(["--model", "m", "--network", "a", "b", "c", "--ratio", "1", "2", "--out", out])
    assert e.value.code == 2
