"""ComfyUI's fp8-scaled files (library/fp8_scaled.py): a tiny model's files written as ComfyUI writes them load
to the weights of their bf16 source within fp8 rounding, in the FLUX.1 transformer, its T5 text encoder and an
SD1 checkpoint; the header check before loading takes them; other ComfyUI quantized formats are named; with
fp8_base an fp8-scaled file's float8 bytes and scales are kept and computed with as ComfyUI does (Anima)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.families import ModelSource, get_family
from library.loading import CheckpointError, read_checkpoint, read_safetensors_header

FP8_MAX = 448.0  # float8_e4m3fn's largest value
# float8_e4m3fn keeps 3 mantissa bits: rounding to nearest moves a normal value by at most 2^-4 of itself; below
# its smallest normal (2^-6) the step is the smallest subnormal 2^-9, so at most 2^-10 (times the scale). The
# dequantized weight is then rounded to bf16 (2^-9 of itself): the bound adds that.
def _fp8_bound(w: torch.Tensor, scale: float) -> torch.Tensor:
    return 2**-4 * w.abs() * (1 + 2**-5) + 2**-10 * scale


def _comfy_fp8_scaled(state: dict, quantized, prefix: str = "") -> tuple[dict, dict]:
    """`state` (bf16) as ComfyUI's fp8_scaled files hold it: each chosen Linear weight divided by its per-tensor
    scale (absolute maximum / 448) in float8_e4m3fn, `scale_weight` and `scale_input` beside it, the
    `scaled_fp8` marker under the model prefix. Also the scales, by weight name."""
    out, scales = {}, {}
    for name, value in state.items():
        if not quantized(name, value):
            out[name] = value
            continue
        scale = value.float().abs().max() / FP8_MAX
        layer = name[:-len(".weight")]
        out[name] = (value.float() / scale).to(torch.float8_e4m3fn)
        out[f"{layer}.scale_weight"] = scale.reshape(())
        out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
        scales[name] = scale.item()
    out[prefix + "scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out, scales


def _linear_weight(name: str, value: torch.Tensor) -> bool:
    return name.endswith(".weight") and value.dim() == 2 and "shared" not in name and "embed" not in name


@pytest.fixture(scope="module")
def comfy_flux(tiny_flux, tmp_path_factory):
    """bf16 copies of the tiny FLUX.1's transformer and T5 files, and the same as fp8_scaled files."""
    folder = tmp_path_factory.mktemp("comfy")
    files, scales = {}, {}
    for part in ("transformer", "t5xxl"):
        source = {k: v.to(torch.bfloat16) for k, v in load_file(str(tiny_flux[part])).items()}
        save_file(source, str(folder / f"{part}_bf16.safetensors"))
        scaled, scales[part] = _comfy_fp8_scaled(source, _linear_weight)
        save_file(scaled, str(folder / f"{part}_fp8_scaled.safetensors"))
        files[part] = {"bf16": folder / f"{part}_bf16.safetensors",
                       "fp8_scaled": folder / f"{part}_fp8_scaled.safetensors"}
    return files, scales


def _load_flux(tiny_flux, transformer, t5xxl):
    source = ModelSource(str(transformer), clip_l=str(tiny_flux["clip_l"]), t5xxl=str(t5xxl),
                         ae=str(tiny_flux["ae"]), arch=str(tiny_flux["folder"]), tokenizer=str(tiny_flux["folder"]))
    return get_family("flux", str(transformer)).load(source)


def _check_within_fp8_rounding(loaded: dict, source: dict, scaled_file: dict, scales: dict, rename) -> int:
    """Every weight of `loaded` equals its bf16 source, or, where the file scaled it, the source within fp8
    rounding (and exactly ComfyUI's dequantization, fp8 value x scale); returns how many were scaled."""
    count = 0
    for name, value in loaded.items():
        file_name = rename(name)
        if file_name not in scales:
            assert torch.equal(value, source[name].to(value.dtype)), name
            continue
        count += 1
        w, scale = source[name].float(), scales[file_name]
        assert torch.equal(value.float(), (scaled_file[file_name].float() * scale).to(torch.bfloat16).float()), name
        assert ((value.float() - w).abs() <= _fp8_bound(w, scale)).all(), name
        assert not ((scaled_file[file_name].float() - w).abs() <= _fp8_bound(w, scale)).all(), name  # the scale counts
    return count


def test_flux_transformer_and_t5_from_fp8_scaled_files(tiny_flux, comfy_flux):
    files, scales = comfy_flux
    plain = _load_flux(tiny_flux, files["transformer"]["bf16"], files["t5xxl"]["bf16"])
    scaled = _load_flux(tiny_flux, files["transformer"]["fp8_scaled"], files["t5xxl"]["fp8_scaled"])
    t5_file = load_file(str(files["t5xxl"]["fp8_scaled"]))
    t5 = scaled.text_encoders["te3"].state_dict()
    n = _check_within_fp8_rounding({k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"},
                                   plain.text_encoders["te3"].state_dict(), t5_file, scales["t5xxl"], lambda k: k)
    assert n == len(scales["t5xxl"]) > 10  # every T5 Linear
    # the transformer: the BFL file's fused / renamed weights, compared as the file holds them
    from library.flux_layout import transformer_to_bfl

    loaded = transformer_to_bfl(scaled.denoiser.state_dict())
    source = transformer_to_bfl(plain.denoiser.state_dict())
    n = _check_within_fp8_rounding(loaded, source, load_file(str(files["transformer"]["fp8_scaled"])),
                                   scales["transformer"], lambda k: k)
    assert n == len(scales["transformer"]) > 20


def test_sd1_checkpoint_from_an_fp8_scaled_file(tiny_sd1, tmp_path):
    """A whole-checkpoint file: the marker and the scaled weights under model.diffusion_model."""
    prefix = "model.diffusion_model."
    source = {k: v.to(torch.bfloat16) for k, v in read_checkpoint(tiny_sd1[1]).items()}
    scaled, scales = _comfy_fp8_scaled(source, lambda k, v: k.startswith(prefix) and _linear_weight(k, v), prefix)
    assert scales and f"{prefix}scaled_fp8" in scaled
    save_file(source, str(tmp_path / "sd1_bf16.safetensors"))
    save_file(scaled, str(tmp_path / "sd1_fp8_scaled.safetensors"))
    read = read_checkpoint(tmp_path / "sd1_fp8_scaled.safetensors")
    assert set(read) == set(source)  # scales and the marker gone
    _check_within_fp8_rounding(read, source, scaled, scales, lambda k: k)
    family = get_family("auto", str(tmp_path / "sd1_fp8_scaled.safetensors"))
    where = {"tokenizer": str(tiny_sd1[0]), "arch": str(tiny_sd1[0])}
    plain = family.load(ModelSource(str(tmp_path / "sd1_bf16.safetensors"), **where))
    loaded = family.load(ModelSource(str(tmp_path / "sd1_fp8_scaled.safetensors"), **where))
    a, b = plain.denoiser.state_dict(), loaded.denoiser.state_dict()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(differ) == sum(1 for k in scales if k.endswith(".weight"))  # the scaled Linear weights, no others
    for k in differ:
        assert ((b[k].float() - a[k].float()).abs() <= _fp8_bound(a[k].float(), max(scales.values()))).all(), k


def test_the_header_check_takes_fp8_scaled_files(flux_config, tiny_flux, comfy_flux):
    from library.fp8_scaled import header_view
    from library.model_files import check_model_files

    files, _ = comfy_flux
    header = read_safetensors_header(files["transformer"]["fp8_scaled"])
    view = header_view(header.tensors)
    assert not any(k.endswith(("scale_weight", "scale_input", "scaled_fp8")) for k in view)
    assert set(view) == set(read_safetensors_header(files["transformer"]["bf16"]).tensors)
    assert {i.dtype for i in view.values()} == {"BF16"} and "F8_E4M3" in {i.dtype for i in header.tensors.values()}
    cfg = flux_config(model={"pretrained_model_name_or_path": str(files["transformer"]["fp8_scaled"]),
                             "t5xxl": str(files["t5xxl"]["fp8_scaled"]), "clip_l": str(tiny_flux["clip_l"]),
                             "ae": str(tiny_flux["ae"]), "arch": str(tiny_flux["folder"]),
                             "tokenizer": str(tiny_flux["folder"])})
    assert check_model_files(cfg).name == "flux"


def test_other_comfy_formats_are_named(comfy_flux, tmp_path):
    files, _ = comfy_flux
    state = load_file(str(files["transformer"]["fp8_scaled"]))
    layer = next(k[:-len(".scale_weight")] for k in state if k.endswith(".scale_weight"))
    new = {(k[:-len("scale_weight")] + "weight_scale" if k.endswith(".scale_weight") else k): v
           for k, v in state.items() if k != "scaled_fp8"}
    assert read_checkpoint_of(new, tmp_path / "new.safetensors").keys() == read_checkpoint(
        files["transformer"]["fp8_scaled"]).keys()  # the newer key names read the same
    conf = torch.tensor(list(json.dumps({"format": "int8_blockwise"}).encode()), dtype=torch.uint8)
    with pytest.raises(CheckpointError, match=r"int8_blockwise.*only ComfyUI's per-tensor scaled fp8") as e:
        read_checkpoint_of({**new, f"{layer}.comfy_quant": conf}, tmp_path / "int8.safetensors")
    assert str(tmp_path / "int8.safetensors") in str(e.value)


def test_header_check_names_other_formats(flux_config, tiny_flux, comfy_flux, tmp_path):
    from library.config import ConfigError
    from library.model_files import check_files

    files, _ = comfy_flux
    state = load_file(str(files["transformer"]["fp8_scaled"]))
    layer = next(k[:-len(".scale_weight")] for k in state if k.endswith(".scale_weight"))
    path = tmp_path / "nvfp4.safetensors"
    save_file(state, str(path), metadata={"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {layer: {"format": "nvfp4"}}})})
    cfg = flux_config(model={"pretrained_model_name_or_path": str(path), "t5xxl": str(tiny_flux["t5xxl"]),
                             "clip_l": str(tiny_flux["clip_l"]), "ae": str(tiny_flux["ae"])})
    with pytest.raises(ConfigError, match=r"'model.pretrained_model_name_or_path'.*nvfp4.safetensors.*'nvfp4'"):
        check_files(cfg)


def read_checkpoint_of(state: dict, path):
    save_file(state, str(path))
    return read_checkpoint(path)


def _scaled_anima_config(anima_config, tiny_anima, path, fp8_base: bool):
    folder = tiny_anima["folder"]
    return anima_config(model={"pretrained_model_name_or_path": str(path), "text_encoder": str(
        tiny_anima["text_encoder"]), "vae": str(tiny_anima["vae"]), "tokenizer": str(folder),
                                      "arch": str(folder)},
        train={"fp8_base": fp8_base, "mixed_precision": "bf16"})


def _prepared(cfg):
    """The config's model loaded and switched as train_network.py does it (no adapters), on the CPU."""
    from library.model_files import load_model
    from library.run import Switches, apply_switches, freeze

    family, parts = load_model(cfg)
    freeze(parts)
    apply_switches(family, parts, Switches.from_config(cfg), [], [], torch.device("cpu"), whole=False)
    return family, parts


def _as_fp8_base_computes(denoiser, scaled: dict) -> None:
    """The bf16 weights fp8_base computes with, written into `denoiser` (bf16): the layers of `scaled` (module path
    -> (float8 weight, scale)) weight.to(bf16) * scale.to(bf16); the other parameters of the layers fp8_base
    stores, rounded to float8_e4m3fn and back."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    for name, layer in denoiser.named_modules():
        if not isinstance(layer, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            continue
        for _, param in layer.named_parameters(recurse=False):
            param.data = param.data.to(torch.float8_e4m3fn).to(torch.bfloat16)
        if name in scaled:
            weight, scale = scaled[name]
            layer.weight.data = weight.to(torch.bfloat16) * scale.to(torch.bfloat16)


def test_fp8_base_keeps_an_fp8_scaled_files_bytes_and_computes_as_comfyui(anima_config, tiny_anima, tmp_path):
    """fp8_base on an fp8-scaled Anima DiT file: every scaled Linear keeps the file's float8 bytes (not the
    dequantized weight rounded to float8 again), so the weights held are the file's fp8 bytes; the prediction is
    exactly that of weights weight.to(bf16) * scale.to(bf16) (ComfyUI's scaled-fp8 rule), and close to that of the
    dequantized weights stored in bf16 (measured: 2.5% of the output's norm on this tiny random model, which
    amplifies per-weight differences of one bf16 rounding; fp8_base without the kept bytes: 4.3%)."""
    from library.anima_layout import original_name

    from conftest import predict_caption

    source = {k: v.to(torch.bfloat16) for k, v in load_file(str(tiny_anima["transformer"])).items()}
    scaled, scales = _comfy_fp8_scaled(source, _linear_weight, "net.")
    path = tmp_path / "anima_fp8_scaled.safetensors"
    save_file(scaled, str(path))
    family, kept = _prepared(_scaled_anima_config(anima_config, tiny_anima, path, fp8_base=True))
    file_names = {name: f"net.{original_name(name)}.weight" for name, m in kept.denoiser.named_modules()
                  if isinstance(m, torch.nn.Linear) and f"net.{original_name(name)}.weight" in scales}
    assert len(file_names) == len(scales) == 56  # every scaled Linear of the DiT and its LLM adapter
    for name, file_name in file_names.items():
        stored = kept.denoiser.get_submodule(name).weight.data
        assert stored.dtype == torch.float8_e4m3fn
        assert torch.equal(stored.view(torch.uint8), scaled[file_name].view(torch.uint8)), name
    held = sum(kept.denoiser.get_submodule(name).weight.nbytes for name in file_names)
    assert held == sum(scaled[k].nbytes for k in scales)  # one byte a weight: the file's

    _, plain = _prepared(_scaled_anima_config(anima_config, tiny_anima, path, fp8_base=False))
    _, comfy = _prepared(_scaled_anima_config(anima_config, tiny_anima, path, fp8_base=False))
    _as_fp8_base_computes(comfy.denoiser, {name: (scaled[file_name], scaled[file_name[:-len(".weight")]
                                                                            + ".scale_weight"])
                                           for name, file_name in file_names.items()})
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs, dequantized = (predict_caption(family, parts, latents).float() for parts in (kept, comfy, plain))
    assert torch.equal(ours, theirs)
    assert (ours - dequantized).norm() / dequantized.norm() < 0.03
    assert not torch.equal(ours, dequantized)
