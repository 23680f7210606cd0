"""The phases a run has besides caching, the step and sampling, planned on the faked device: class images for
prior preservation (train_db, library/prior.py) and saving (the file's tensors built on the host)."""
from __future__ import annotations

import dataclasses

import pytest

from library.config import NetworkSection
from library.planner import format_plan, plan
from library.planner.step import StepSettings, measure_step


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.fixture(scope="module")
def sd1_db(tiny_sd1):
    return StepSettings(recipe="db", family="sd1", arch=str(tiny_sd1[0]), width=64, height=64, batch_size=1,
                        optimizer_type="Adafactor", train_text_encoder=False,
                        network=NetworkSection(network_dim=4, network_alpha=2.0))


def test_class_images_are_planned_only_with_prior_preservation(sd1_db, tiny_sd1):
    """Prior preservation generates class images before anything else, from the model as loaded (fp32) with the
    denoiser on the device: a phase of its own, larger at a larger resolution; without it no such phase."""
    from library.families import get_family
    from library.families.base import ModelSource

    without = plan(sd1_db)
    small = plan(dataclasses.replace(sd1_db, class_images=True))
    large = plan(dataclasses.replace(sd1_db, class_images=True, width=128, height=128))
    assert "class images" not in without.phases and "class images" not in format_plan(without)
    assert list(small.phases)[0] == "class images" and "class images" in format_plan(small)
    denoiser = get_family("sd1", "").load(ModelSource(str(tiny_sd1[0]))).denoiser
    assert small.phases["class images"].allocated >= _bytes(denoiser.parameters()) + small.card.cublas_workspace
    assert large.phases["class images"].allocated > small.phases["class images"].allocated
    assert {k: v for k, v in small.phases.items() if k != "class images"}.keys() == without.phases.keys()


@pytest.fixture(scope="module")
def flux_full(tiny_flux):
    return StepSettings(recipe="db", family="flux", arch=str(tiny_flux["folder"]), width=64, height=64,
                        optimizer_type="Adafactor", fused_backward_pass=True, max_grad_norm=0.0,
                        train_text_encoder=False, cache_latents=True, cache_text_encoder_outputs=True,
                        network=NetworkSection(network_dim=4, network_alpha=2.0))


def _flux_file_bytes(folder) -> tuple[int, int]:
    """(the host copy of the transformer's state dict, the fused tensors the BFL layout adds), from the real
    tiny model."""
    from library.families import get_family
    from library.families.base import ModelSource
    from library.flux_layout import transformer_to_bfl
    from library.memory import host_state_dict

    parts = get_family("flux", "").load(ModelSource(str(folder)))
    state = host_state_dict(parts.denoiser)
    inputs = {v.untyped_storage().data_ptr() for v in state.values()}
    fused = [v for v in transformer_to_bfl(state).values() if v.untyped_storage().data_ptr() not in inputs]
    return _bytes(state.values()), _bytes(fused)


def _save_spike(m) -> int:
    """Bytes the save window's peak holds beyond what was on the device when it opened."""
    first, _ = m.tracker.spans["save"]
    alive = sum(r.nbytes for r in m.tracker.records if r.born <= first and (r.died is None or r.died > first))
    return m.phases["save"].bytes - alive


def test_saving_a_flux_full_fine_tune_builds_the_fused_tensors_on_the_host(flux_full, tiny_flux, monkeypatch):
    """Defect 11's fix, planned: the BFL file's fused qkv tensors are built from host copies, so the plan shows
    no device spike while saving and a host figure of the state dict's copy plus the fused tensors (computed
    here from the real tiny model: 543,232 + 118,272 bytes). Built from the device weights (as before the fix),
    the same plan shows them on the device."""
    import library.memory

    state, fused = _flux_file_bytes(tiny_flux["folder"])
    assert (state, fused) == (543_232, 118_272)
    m = measure_step(flux_full)
    assert m.host["saving: the file's tensors, built on the host (while written)"] == state + fused
    assert _save_spike(m) == 0
    p = plan(flux_full)
    assert p.host_peak - p.host_training == state + fused
    assert p.phases["save"].allocated <= p.phases["step"].allocated
    assert "host RAM while saving" in format_plan(p)

    monkeypatch.setattr(library.memory, "host_state_dict",
                        lambda module: {k: v.detach().to("cpu") for k, v in module.state_dict().items()})
    on_device = measure_step(flux_full)
    assert _save_spike(on_device) >= fused
    assert not any(k.startswith("saving") for k in on_device.host)
