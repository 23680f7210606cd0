"""One GPU of N under ZeRO-1/2/3 and FSDP2 (library/planner/sharding.py): what divides by N, what moves to host
RAM, what is gathered, checked against the parameter counts of the full-size SDXL and FLUX.1-dev denoisers
(built on the meta device, no weights), and the plan of a launched environment carrying them."""
from __future__ import annotations

import dataclasses

import pytest
from accelerate import init_empty_weights

from library.families import get_family
from library.loading import arch_dir
from library.planner.allocator import PhaseMemory
from library.planner.card import Card
from library.planner.plan import Plan, plan
from library.planner.sharding import Sharding, largest_unit_parameters, launched_sharding, per_gpu, sharded_plan
from library.planner.step import StepSettings

GIB = 2**30


def _denoiser(family_name: str, arch: str):
    family = get_family(family_name, "")
    with init_empty_weights():
        return family, family.planning_parts(arch_dir(arch)).denoiser


@pytest.fixture(scope="module")
def sdxl():
    return _denoiser("sdxl", "sdxl")


@pytest.fixture(scope="module")
def flux():
    return _denoiser("flux", "flux-dev")


def test_the_largest_unit_is_a_block_of_the_family_block_classes(sdxl, flux):
    """FLUX.1-dev's largest unit is a double-stream block, counted here from its shapes (hidden 3072, MLP 4x,
    head dim 128): per stream q, k, v and the output projection (4 x 3072^2 + biases), the MLP (2 x 3072 x 12288
    + biases), the 6-way modulation (3072 x 18432 + bias), and 4 RMSNorm weights of 128."""
    family, denoiser = flux
    h, mlp, mod = 3072, 12288, 6 * 3072
    stream = 4 * (h * h + h) + (h * mlp + mlp) + (mlp * h + h) + (h * mod + mod)
    assert largest_unit_parameters(family, denoiser) == 2 * stream + 4 * 128 == 339_831_296
    assert sum(p.numel() for p in denoiser.parameters()) == 11_901_408_320
    family, denoiser = sdxl
    blocks = [m for m in denoiser.modules() if type(m).__name__ in family.block_classes]
    assert len([b for b in blocks if type(b).__name__ == "BasicTransformerBlock"]) == 70  # SDXL: 4 + 20 down, 10 mid, 36 up
    rest = sum(p.numel() for p in denoiser.parameters()) - sum(p.numel() for b in blocks for p in b.parameters())
    assert largest_unit_parameters(family, denoiser) == max(rest, *(sum(p.numel() for p in b.parameters())
                                                                    for b in blocks))


@pytest.mark.parametrize("model", ["sdxl", "flux"])
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_per_gpu_shares_divide_by_the_processes(request, model, engine):
    """AdamW, fp32 trained weights, bf16 compute: 4 + 4 + 8 bytes per parameter in one process. ZeRO-2 divides
    the gradients and the optimizer state by N; ZeRO-3 and FSDP2 the weights too, and gather the largest unit
    twice in bf16 (the block computing and the one prefetched) with its fp32 gradient."""
    family, denoiser = request.getfixturevalue(model)
    params = sum(p.numel() for p in denoiser.parameters())
    whole = {"trained weights": 4 * params, "gradients": 4 * params, "optimizer state": 8 * params}
    unit = largest_unit_parameters(family, denoiser)
    for n in (1, 2, 4):
        share = per_gpu(Sharding(engine, n), whole, unit, compute_bytes=2)
        weights = 4 * params if engine == "zero2" else -(-4 * params // n)
        assert share.kept == {"trained weights": weights, "gradients": -(-4 * params // n),
                              "optimizer state": -(-8 * params // n)}
        assert share.gathered == (0 if engine == "zero2" else unit * (2 * 2 + 4)) and share.host == 0
        assert share.saved == 16 * params - sum(share.kept.values()) - share.gathered
    four = per_gpu(Sharding(engine, 4), whole, unit, 2)
    if model == "flux" and engine != "zero2":  # the question: FLUX.1-dev, full fine-tune, 4 x 24 GB
        assert round(sum(four.kept.values()) / GIB, 2) == 44.34  # 16 bytes x 11.9e9 / 4: does not fit 24 GB
        assert round(four.gathered / GIB, 2) == 2.53


def test_offload_moves_the_shares_to_host_ram(flux):
    family, denoiser = flux
    params = sum(p.numel() for p in denoiser.parameters())
    whole = {"trained weights": 4 * params, "gradients": 4 * params, "optimizer state": 8 * params}
    unit = largest_unit_parameters(family, denoiser)
    optimizer = per_gpu(Sharding("zero3", 4, offload_optimizer=True), whole, unit, 2)
    assert optimizer.kept["optimizer state"] == 0 and optimizer.host == -(-8 * params // 4)
    assert optimizer.kept["trained weights"] == optimizer.kept["gradients"] == -(-4 * params // 4)
    both = per_gpu(Sharding("zero3", 4, True, True), whole, unit, 2)
    assert both.kept == {"trained weights": 0, "gradients": -(-4 * params // 4), "optimizer state": 0}
    fsdp = per_gpu(Sharding("fsdp2", 4, True, True), whole, unit, 2)  # FSDP2's CPU offload: the step on the CPU
    assert sum(fsdp.kept.values()) == 0 and fsdp.host == -(-16 * params // 4)
    assert round(fsdp.gathered / GIB, 2) == 2.53  # what one GPU still holds of the weights


def test_a_plan_becomes_one_gpu_of_n(sdxl):
    """sharded_plan on a full SDXL fine-tune's step (figures of one process: frozen VAE / text encoders 1 GiB,
    activations 3 GiB): the step's peak and reserved memory and the breakdown lose exactly what FSDP2 saves on
    4 processes; the phases before the denoiser comes to the device are left alone; a note says it; the EMA's
    host copy is one process' shards."""
    family, denoiser = sdxl
    params = sum(p.numel() for p in denoiser.parameters())
    breakdown = {"weights": 4 * params + GIB, "gradients": 4 * params, "optimizer state": 8 * params,
                 "activations": 3 * GIB}
    peak = sum(breakdown.values())
    s = StepSettings(recipe="db", family="sdxl", arch="sdxl", width=1024, height=1024, mixed_precision="bf16")
    one = Plan(s, peak, breakdown, GIB, GIB, [], 0.0, params,
               {"vae": PhaseMemory(GIB, GIB), "step": PhaseMemory(peak, peak + GIB)}, Card(),
               {"EMA copy (fp32)": 4 * params, "vae (latents cached)": GIB})
    assert sharded_plan(one) is one
    four = sharded_plan(dataclasses.replace(one, settings=dataclasses.replace(s, sharding=Sharding("fsdp2", 4))))
    unit = largest_unit_parameters(family, denoiser)
    kept = 3 * -(-4 * params // 4) + -(-8 * params // 4) - -(-4 * params // 4)
    saved = 16 * params - kept - unit * 8
    assert four.peak == peak - saved and four.phases["step"] == PhaseMemory(peak - saved, peak + GIB - saved)
    assert four.phases["vae"] == PhaseMemory(GIB, GIB)
    assert four.breakdown["weights"] == GIB + -(-4 * params // 4) and four.breakdown["gathered units"] == unit * 8
    assert four.notes[-1].startswith("FSDP2 over 4 processes: one GPU holds 9.56 GiB of the step's 38.26 GiB")
    assert four.host == {"EMA copy (fp32)": -(-4 * params // 4), "vae (latents cached)": GIB}  # EMA: its shards


@pytest.mark.parametrize("env, expected", [
    ({}, None), ({"WORLD_SIZE": "4"}, None),
    ({"WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
     Sharding("zero2", 4)),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"},
     Sharding("zero3", 2, True, True)),
    ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
      "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, Sharding("zero2", 2)),  # ZeRO-2 shards no weights
    ({"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, Sharding("fsdp2", 4)),
    ({"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"},
     Sharding("fsdp2", 4, True, True))])
def test_the_launched_environment_names_the_sharding(env, expected):
    """What `accelerate launch` sets (accelerate 1.15, utils/launch.py) is what the plan divides by."""
    assert launched_sharding(env) == expected


@pytest.mark.slow
def test_the_planned_run_under_fsdp2_through_the_config(make_config, monkeypatch):
    """`ACCELERATE_USE_FSDP=true FSDP_VERSION=2 WORLD_SIZE=2 train_db.py --plan`: the settings carry the
    sharding (and no DDP buckets), and the measured plan of the tiny SD1 full fine-tune (real tensors on the CPU,
    measured once, for one process) drops by what FSDP2 saves on one GPU of 2, the optimizer step's
    temporaries included."""
    import importlib

    from library.planner import settings_from_config

    plan_module = importlib.import_module("library.planner.plan")  # the module (the package names its function)

    for key, value in {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}.items():
        monkeypatch.setenv(key, value)
    s = settings_from_config(make_config(dreambooth={"train_text_encoder": False}), "db")
    assert s.sharding == Sharding("fsdp2", 2) and s.processes == 1
    for key in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):  # measured in this one process
        monkeypatch.delenv(key)
    measured = []
    monkeypatch.setattr(plan_module, "sharded_plan", lambda p: measured.append(p) or sharded_plan(p))
    two = plan(s, fake=False)
    one = measured[0]
    assert one.breakdown["gradients"] == 4 * one.trainable  # fp32 gradients of every trained weight
    whole = 4 * one.trainable + one.breakdown["gradients"] + one.breakdown["optimizer state"]
    family = get_family("sd1", "")
    with init_empty_weights():
        unit = largest_unit_parameters(family, family.planning_parts(arch_dir(s.arch)).denoiser)
    kept = sum(-(-v // 2) for v in (4 * one.trainable, one.breakdown["gradients"], one.breakdown["optimizer state"]))
    steady = whole - kept - unit * 12  # no mixed precision: gathered in fp32
    temporaries = one.optimizer_temporaries  # foreach AdamW's at the optimizer step: one fp32 list, halved
    assert temporaries == 4 * one.trainable and one.peak_before_optimizer < one.peak
    assert two.peak == max(one.peak - steady - (temporaries - -(-temporaries // 2)), one.peak_before_optimizer - steady)
    assert one.peak - two.peak == steady + temporaries // 2  # the optimizer step stays the peak
    assert two.notes[-1].startswith("FSDP2 over 2 processes")


def _with_sharding(p, sharding):
    return sharded_plan(dataclasses.replace(p, settings=dataclasses.replace(p.settings, sharding=sharding)))


def test_the_optimizer_steps_temporaries_divide_too(sdxl):
    """Each engine steps only its shard, so foreach AdamW's per-step lists (here one fp32 copy of the weights,
    4 GiB) divide by N with the state: ZeRO-1 over 4 at a step whose peak is the optimizer step (20 GiB) keeps a
    quarter of them; the step's peak is then the larger of the optimizer step's and the peak before it (17 GiB,
    less what sharding saves there), which wins once the temporaries are gone (ZeRO-1 with the optimizer
    offloaded: its step and temporaries on the CPU)."""
    family, denoiser = sdxl
    params = sum(p.numel() for p in denoiser.parameters())
    state, temporaries = 8 * params, 4 * params
    breakdown = {"weights": 4 * params, "gradients": 4 * params, "optimizer state": state,
                 "temporaries": temporaries}
    peak, before = 20 * params, 17 * params
    s = StepSettings(recipe="db", family="sdxl", arch="sdxl", width=1024, height=1024, mixed_precision="bf16")
    one = Plan(s, peak, breakdown, GIB, GIB, [], 0.0, params, {"step": PhaseMemory(peak, peak + GIB),
                                                               "sample": PhaseMemory(GIB, 2 * GIB)}, Card(),
               optimizer_temporaries=temporaries, peak_before_optimizer=before)
    zero1 = _with_sharding(one, Sharding("zero1", 4))
    steady = state - -(-state // 4)
    assert zero1.peak == peak - steady - (temporaries - -(-temporaries // 4)) == 11 * params  # not 14
    assert zero1.breakdown["temporaries"] == params and zero1.phases["step"].reserved == 11 * params + GIB
    assert zero1.phases["sample"] == PhaseMemory(GIB - steady, 2 * GIB - steady) or GIB < steady
    offloaded = _with_sharding(one, Sharding("zero1", 4, offload_optimizer=True))
    assert offloaded.peak == before - state == 9 * params  # the optimizer step's peak fell below 9 x params
    assert offloaded.breakdown["temporaries"] == 0 and offloaded.host["offloaded shards"] == 2 * params + params
    assert "the optimizer step's temporaries 9.56 -> 2.39 GiB" in zero1.notes[-1]  # SDXL U-Net: 2.57e9 params


@pytest.mark.slow
def test_measured_optimizer_temporaries_of_foreach_adamw(tiny_sd1):
    """The tiny SD1 full fine-tune's plan (fake tensors): foreach AdamW's temporaries at the step's peak are one
    fp32 list the size of the trained weights (its sqrt of the second moments), 4 bytes x 1,466,500; on one GPU
    of 4 under ZeRO-1 / ZeRO-2 they divide by 4 with the state (and the gradients): the figures below."""
    s = StepSettings(recipe="db", family="sd1", arch=str(tiny_sd1[0]), width=64, height=64, batch_size=2,
                     train_text_encoder=False, optimizer_type="AdamW")
    one = plan(s)
    assert one.trainable == 1_466_500 and one.optimizer_temporaries == 4 * one.trainable
    state = one.breakdown["optimizer state"]
    assert state == 11_733_296 and one.breakdown["gradients"] == 4 * one.trainable
    zero1, zero2 = _with_sharding(one, Sharding("zero1", 4)), _with_sharding(one, Sharding("zero2", 4))
    steady = state - -(-state // 4)
    assert zero1.peak == one.peak - steady - 3 * one.trainable
    assert zero2.peak == one.peak - steady - 3 * one.trainable - 3 * one.trainable
    assert zero1.breakdown["temporaries"] == one.breakdown["temporaries"] - 3 * one.trainable
