"""T5-XXL while encoding: fp8 / int8 storage (model.t5xxl_precision), the padding mask in the denoiser's
attention (apply_t5_attn_mask), and text caches that know the T5 settings. On the tiny FLUX model."""
import copy

import pytest
import torch

from goldens import GOLDEN_FLUX
from library.config import ConfigError
from library.families.base import ModelSource
from library.families.flux import FluxFamily
from library.quantization import store_t5, weight_bytes


def _parts(tiny_flux, **source):
    parts = FluxFamily().load(ModelSource(str(tiny_flux["folder"]), t5xxl_max_token_length=16, **source))
    for module in [parts.denoiser, parts.vae, *parts.text_encoders.values()]:
        module.requires_grad_(False)
    return parts


@pytest.mark.parametrize("precision, dtype", [("fp8", torch.float8_e4m3fn), ("int8", torch.int8)])
def test_t5_stored_small_encodes_nearly_the_same(tiny_flux, precision, dtype):
    parts = _parts(tiny_flux)
    t5 = parts.text_encoders["te3"]
    before = weight_bytes(t5)
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = t5(ids).last_hidden_state
    small = copy.deepcopy(parts)
    assert store_t5(small, precision, torch.float32) == ["te3"]
    t5_small = small.text_encoders["te3"].to("cpu")  # int8 weights are quantized when they move
    linear = [m.weight for n, m in t5_small.named_modules() if n.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "wi_0", "wi_1", "wo")]
    assert linear and all(w.dtype == dtype for w in linear)
    # fp32 -> 1 byte per Linear weight: the tiny T5's Linear weights are most of it
    assert weight_bytes(t5_small) < 0.4 * before
    out = t5_small(ids).last_hidden_state
    error = ((out - reference).abs().max() / reference.abs().max()).item()
    assert 0 < error < 0.1
    assert small.text_encoders["te1"] is not None and weight_bytes(small.text_encoders["te1"]) == weight_bytes(
        parts.text_encoders["te1"])  # CLIP untouched


def test_t5_precision_errors(tiny_flux, tiny_sd1):
    from library.families import get_family

    parts = _parts(tiny_flux)
    parts.text_encoders["te3"].requires_grad_(True)
    with pytest.raises(ConfigError, match="te3.*frozen"):
        store_t5(parts, "fp8", torch.bfloat16)
    sd1 = get_family("auto", str(tiny_sd1[0])).load(ModelSource(str(tiny_sd1[0])))
    with pytest.raises(ConfigError, match="no T5"):
        store_t5(sd1, "int8", torch.float32)
    assert store_t5(sd1, "auto", torch.float32) == []


def test_lora_run_with_fp8_t5(flux_config):
    from train_network import train

    losses = train(flux_config(model={"t5xxl_precision": "fp8"})).losses
    assert losses != pytest.approx(GOLDEN_FLUX, rel=1e-6)  # the T5 output changed ...
    assert losses == pytest.approx(GOLDEN_FLUX, rel=0.05)  # ... a little


def test_padding_is_masked_out_of_the_joint_attention(tiny_flux):
    """With apply_t5_attn_mask the prediction does not depend on what sits at padded text positions."""
    family = FluxFamily()
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    outs = {}
    for masked in (True, False):
        parts = _parts(tiny_flux, apply_t5_attn_mask=masked)
        with torch.no_grad():
            cond = family.encode_prompts(parts, ["a red dog"], 1)
            assert ("t5_attention_mask" in cond) == masked
            n = len(parts.tokenizers["te3"]("a red dog").input_ids)
            noisy = dict(cond, prompt_embeds=cond["prompt_embeds"].clone())
            noisy["prompt_embeds"][:, n:] = torch.randn_like(noisy["prompt_embeds"][:, n:])
            outs[masked] = (family.predict(parts, latents, t, cond), family.predict(parts, latents, t, noisy))
    assert torch.allclose(*outs[True], atol=1e-6)
    assert not torch.allclose(*outs[False], atol=1e-3)


def test_text_cache_is_stale_when_t5_settings_change(flux_config, tmp_path):
    from train_network import train

    cache = {"cache_text_encoder_outputs_to_disk": True}
    frozen = {"network_train_unet_only": True}
    shared = {"dataset": {"cache_dir": str(tmp_path / "cache")}, "network": frozen}
    train(flux_config(train={**cache, "max_train_steps": 1}, **shared))
    files = sorted((tmp_path / "cache" / "text").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    cfg = flux_config(train={**cache, "max_train_steps": 1, "output_dir": str(tmp_path / "b")},
                      model={"apply_t5_attn_mask": True}, **shared)
    train(cfg)
    assert all(p.stat().st_mtime_ns != stamps[p] for p in files)  # re-encoded: the mask changes T5's output


def test_lora_run_with_int8_t5_and_cached_text(flux_config):
    from train_network import train

    result = train(flux_config(model={"t5xxl_precision": "int8"}, network={"network_train_unet_only": True},
                               train={"cache_text_encoder_outputs": True}))
    t5 = result.parts.text_encoders["te3"]
    assert t5.device.type == "cpu"  # visited the device while encoding, then stayed on the host
    assert {m.weight.dtype for m in t5.modules() if type(m).__name__ == "Linear8bitLt"} == {torch.int8}
    assert len(result.losses) == 4 and result.losses != pytest.approx(GOLDEN_FLUX, rel=1e-6)
