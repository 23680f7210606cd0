"""The memory planner: its estimate against real allocations, and each switch lowering its category."""
from __future__ import annotations

import dataclasses

import pytest

from library.config import NetworkSection
from library.planner import plan
from library.planner.step import StepSettings


@pytest.fixture(scope="module")
def tiny(tiny_sd1):
    folder = tiny_sd1[0]
    base = StepSettings(recipe="network", family="sd1", arch=str(folder), width=64, height=64, batch_size=2,
                        network=NetworkSection(network_dim=4, network_alpha=2.0))
    return base


def _plan(s, fake=True):
    return plan(s, fake=fake)


@pytest.mark.parametrize("change", [{}, {"recipe": "db", "optimizer_type": "Adafactor"},
                                    {"mixed_precision": "bf16", "gradient_checkpointing": True}])
def test_estimate_matches_real_allocations_within_10_percent(tiny, change):
    s = dataclasses.replace(tiny, **change)
    fake, real = _plan(s, fake=True), _plan(s, fake=False)
    assert real.peak > 0
    assert abs(fake.peak - real.peak) <= 0.10 * real.peak, (fake.peak, real.peak)
    for key in ("weights", "gradients", "optimizer state"):
        assert abs(fake.breakdown[key] - real.breakdown[key]) <= 0.10 * max(real.breakdown[key], 1), key


def test_checkpointing_lowers_activations(tiny):
    off = _plan(tiny)
    on = _plan(dataclasses.replace(tiny, gradient_checkpointing=True))
    assert on.breakdown["activations"] < off.breakdown["activations"]


@pytest.mark.parametrize("optimizer", ["AdamW8bit", "Adafactor"])
def test_8bit_and_factored_optimizers_lower_the_state(tiny, optimizer):
    s = dataclasses.replace(tiny, recipe="db")
    adamw = _plan(s)
    other = _plan(dataclasses.replace(s, optimizer_type=optimizer))
    assert other.breakdown["optimizer state"] < 0.6 * adamw.breakdown["optimizer state"]
    if optimizer == "AdamW8bit":
        assert any("bitsandbytes" in n for n in other.notes)


def test_fused_backward_lowers_gradients(tiny):
    s = dataclasses.replace(tiny, recipe="db", optimizer_type="Adafactor")
    plain = _plan(s)
    fused = _plan(dataclasses.replace(s, fused_backward_pass=True))
    assert fused.breakdown["gradients"] < 0.5 * plain.breakdown["gradients"]


def test_mixed_precision_lowers_weights(tiny):
    full = _plan(tiny)
    half = _plan(dataclasses.replace(tiny, mixed_precision="bf16"))
    assert half.breakdown["weights"] < 0.6 * full.breakdown["weights"]


def test_cached_outputs_take_the_vae_off_the_device(tiny):
    s = dataclasses.replace(tiny, train_text_encoder=False)
    plain = _plan(s)
    cached = _plan(dataclasses.replace(s, cache_latents=True, cache_text_encoder_outputs=True))
    assert cached.breakdown["weights"] < plain.breakdown["weights"]


def test_plan_flag_prints_the_breakdown(make_config, capsys):
    import toml

    import train_network

    cfg = make_config()
    path = cfg.source
    raw = cfg.to_toml_dict()
    raw["model"]["family"] = "sd1"
    raw["model"]["arch"] = raw["model"]["pretrained_model_name_or_path"]
    from pathlib import Path
    out = Path(raw["train"]["output_dir"]).parent / "plan.toml"
    out.write_text(toml.dumps(raw))
    assert train_network.main(["--config", str(out), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "peak device memory of the training step" in text and "activations" in text
    del path


def test_cached_text_encoders_visit_the_device_one_at_a_time(tiny_sdxl):
    """SDXL's two text encoders: with cached outputs the text phase holds the larger one, not both."""
    from library.families import get_family
    from library.families.base import ModelSource

    parts = get_family("auto", str(tiny_sdxl[0])).load(ModelSource(str(tiny_sdxl[0])))
    sizes = sorted(sum(p.numel() * 4 for p in m.parameters()) for m in parts.text_encoders.values())
    base = StepSettings(recipe="network", family="sdxl", arch=str(tiny_sdxl[0]), width=64, height=64, batch_size=1,
                        network=NetworkSection(network_dim=4, network_alpha=2.0), train_text_encoder=False,
                        cache_latents=True)
    resident = _plan(base, fake=False)
    visiting = _plan(dataclasses.replace(base, cache_text_encoder_outputs=True), fake=False)
    assert resident.text_peak - visiting.text_peak == pytest.approx(sizes[0], rel=0.05)
    assert visiting.vae_peak == resident.vae_peak  # text encoders come after the VAE pass either way


def test_sampling_brings_the_parts_over_while_the_training_state_stays(tiny, tiny_sd1):
    """With cached latents and text outputs the VAE and text encoder are off the device while training;
    sampling (library/sampling.py, offload.visiting) brings the text encoder to encode, then the VAE to decode,
    with the training state still there: the VAE decodes beside the denoiser's weights."""
    from library.families import get_family
    from library.families.base import ModelSource

    s = dataclasses.replace(tiny, cache_latents=True, cache_text_encoder_outputs=True, train_text_encoder=False,
                            sample=True)
    p = _plan(s, fake=False)
    parts = get_family("sd1", "").load(ModelSource(str(tiny_sd1[0])))

    def size(*modules):
        return sum(t.numel() * 4 for m in modules for t in [*m.parameters(), *m.buffers()])

    every_part = size(parts.denoiser, parts.vae, *parts.text_encoders.values())
    assert p.breakdown["weights"] + p.breakdown["adapter weights"] < every_part  # the step: the denoiser alone
    assert p.phases["sample"].allocated >= size(parts.denoiser, parts.vae) + p.card.cublas_workspace
    assert p.phases["sample"].reserved >= p.phases["step"].reserved
    assert "vae (latents cached)" in p.host


def test_ddp_buckets_add_one_copy_of_the_gradients_per_gpu(tiny):
    """Under DDP each GPU holds its all-reduce buckets (a flat copy of every trained gradient) for the whole
    run: the step's peak grows by exactly the trained gradients' bytes; with ddp_gradient_as_bucket_view the
    gradients are views into the buckets and the plan is the one-GPU plan."""
    s = dataclasses.replace(tiny, recipe="db", optimizer_type="Adafactor")
    one = _plan(s)
    two = _plan(dataclasses.replace(s, processes=2))
    viewed = _plan(dataclasses.replace(s, processes=2, ddp_gradient_as_bucket_view=True))
    assert two.peak - one.peak == 4 * one.trainable  # fp32 gradients
    assert two.breakdown["gradients"] - one.breakdown["gradients"] == 4 * one.trainable
    assert viewed.peak == one.peak
    assert any("DDP over 2 processes" in n for n in two.notes) and not any("DDP" in n for n in viewed.notes)
