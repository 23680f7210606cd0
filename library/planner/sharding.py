"""One GPU of N under accelerate's sharded engines: what of a full fine-tune's step memory each engine divides
by the number of processes, what it moves to host RAM, and what it gathers back while the step runs. The step is
measured for one process (library/planner/step.py); these figures are applied to that measurement.

    ZeRO-1   optimizer state / N
    ZeRO-2   optimizer state and gradients / N
    ZeRO-3   optimizer state, gradients and trained weights / N, plus the gathered units (below)
    FSDP2    as ZeRO-3: weights, gradients and optimizer state sharded N ways, plus the gathered units
    offload  ZeRO's offload_optimizer_device = cpu: the optimizer state (its share) in host RAM; offload_param
             (ZeRO-3) / FSDP2's cpu offload: the weight shards too, and with FSDP2 the gradient shards and the
             optimizer step (its state) as well
    EMA      (train_db.py's use_ema, in host RAM) / N under FSDP2: each process averages its own shards

Every engine steps only its shard of the optimizer state, so the optimizer step's temporaries (foreach / fused
AdamW's per-step lists, the clipping's norms: "optimizer temporaries") divide by N too, or go to the CPU with an
offloaded optimizer step; the step's peak is then the larger of its peak before the optimizer step (less what
sharding saves) and the optimizer step's (less that and the temporaries' saving).

Gathered units (ZeRO-3, FSDP2): a block's full weights are all-gathered for its forward and again for its
backward, one block at a time plus the next one prefetched, and its full gradient lives until it is
reduce-scattered: 2 x the largest unit's weights in the compute dtype + its gradient in fp32. The units are the
family's block classes (ModelFamily.block_classes, FSDP2's auto-wrap); the rest of the denoiser (its input and
output layers, embeddings) is one more unit, gathered the same way.

DeepSpeed keeps the model weights in half precision and an fp32 master copy in the optimizer state (2 + 2 + 12
bytes per AdamW parameter) where the measured step holds fp32 weights and gradients (4 + 4 + 8): the same 16
bytes, divided the same way at ZeRO-3; at ZeRO-1/2 the undivided half-precision weights are 2 bytes less than
measured, which the figures leave as they are (the plan errs on the safe side).
"""
from __future__ import annotations

import dataclasses
import os

STEP = ("optimizer state", "optimizer temporaries")  # the optimizer step's, on every engine
DIVIDED = {"zero1": STEP, "zero2": (*STEP, "gradients"), "zero3": (*STEP, "gradients", "trained weights"),
           "fsdp2": (*STEP, "gradients", "trained weights")}
EMA = "EMA copy (fp32)"  # library/planner/step.py's host figure of train_db.py's EMA
NAMES = {"zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "FSDP2"}


@dataclasses.dataclass(frozen=True)
class Sharding:
    """A sharded engine over `processes` processes."""
    engine: str  # "zero1", "zero2", "zero3" or "fsdp2"
    processes: int
    offload_optimizer: bool = False  # the optimizer state's share in host RAM
    offload_params: bool = False  # the weight shards in host RAM too (ZeRO-3, FSDP2)

    @property
    def gathers(self) -> bool:
        return self.engine in ("zero3", "fsdp2")

    def name(self) -> str:
        offload = ("; optimizer state offloaded" if self.offload_optimizer else "") + (
            "; weights offloaded" if self.offload_params else "")
        return f"{NAMES[self.engine]} over {self.processes} processes{offload}"


def launched_sharding(environ=None) -> Sharding | None:
    """The sharded engine `accelerate launch` set up (the environment library/engines.py reads), None for one
    process or DDP. DeepSpeed: ACCELERATE_DEEPSPEED_ZERO_STAGE, ..._OFFLOAD_OPTIMIZER_DEVICE, ..._OFFLOAD_PARAM_DEVICE;
    FSDP2: FSDP_OFFLOAD_PARAMS (weights, gradients and the optimizer step on the CPU)."""
    from library.engines import launched_engine, launched_processes

    env = os.environ if environ is None else environ
    engine, processes = launched_engine(env), launched_processes(env)
    if engine == "deepspeed":
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)
        if stage == 0:
            return None  # ZeRO-0: plain data parallelism
        return Sharding(f"zero{stage}", processes,
                        env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none").lower() == "cpu",
                        stage == 3 and env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() == "cpu")
    if engine == "fsdp2":
        offload = env.get("FSDP_OFFLOAD_PARAMS", "false").lower() in ("1", "true", "yes")
        return Sharding("fsdp2", processes, offload, offload)
    return None


@dataclasses.dataclass
class PerGpu:
    """One process' share of the step's sharded parts, in bytes: `whole` as one process holds them (the
    measured step), `kept` on the GPU once sharded, `host` moved to host RAM, `gathered` the units gathered
    while the step runs; `saved` on the GPU against one process."""
    whole: dict[str, int]
    kept: dict[str, int]
    host: int
    gathered: int

    @property
    def saved(self) -> int:
        return sum(self.whole.values()) - sum(self.kept.values()) - self.gathered


def per_gpu(sharding: Sharding, whole: dict[str, int], largest_unit: int, compute_bytes: int) -> PerGpu:
    """`whole`: bytes of "trained weights", "gradients", "optimizer state" (and "optimizer temporaries", the
    optimizer step's own at the peak) in one process' step;
    `largest_unit`: parameters of the denoiser's largest unit (largest_unit_parameters); `compute_bytes`: bytes
    per weight as the forward computes (2 under fp16 / bf16, else 4)."""
    n = sharding.processes
    divided = DIVIDED[sharding.engine]
    kept = {k: -(-v // n) if k in divided else v for k, v in whole.items()}  # ceil: shards are padded to N
    offloaded = [k for k in STEP if k in kept] if sharding.offload_optimizer else []
    if sharding.offload_params:
        offloaded += ["trained weights"] + (["gradients"] if sharding.engine == "fsdp2" else [])
    host = sum(kept[k] for k in offloaded)
    kept.update({k: 0 for k in offloaded})
    gathered = largest_unit * (2 * compute_bytes + 4) if sharding.gathers else 0
    return PerGpu(dict(whole), kept, host, gathered)


def largest_unit_parameters(family, denoiser) -> int:
    """Parameters of the denoiser's largest FSDP2 / ZeRO-3 unit: a block of the family's block classes, or the
    rest of the denoiser outside them (its own unit), whichever is larger."""
    names = set(family.block_classes)
    blocks = [m for m in denoiser.modules() if type(m).__name__ in names]
    inside = {id(p) for b in blocks for p in b.parameters()}
    rest = sum(p.numel() for p in denoiser.parameters() if id(p) not in inside)
    return max([rest, *(sum(p.numel() for p in b.parameters()) for b in blocks)])


def sharded_plan(p):
    """The plan (library.planner.plan.Plan) of one GPU of N under its settings' sharding: the step's trained
    weights, gradients and optimizer state divided and offloaded as the engine does, the gathered units added,
    the step's peak and reserved memory lowered by what that saves; a note says so. One process / DDP: `p`."""
    from accelerate import init_empty_weights

    from library.families import get_family
    from library.loading import arch_dir
    from library.planner.allocator import PhaseMemory

    s = p.settings
    sharding = s.sharding
    if sharding is None:
        return p
    family = get_family(s.family, "")
    with init_empty_weights():  # parameters on the meta device: counted, never allocated
        denoiser = family.planning_parts(arch_dir(s.arch)).denoiser
    trained_bytes = 2 if (s.full_fp16 or s.full_bf16) else 4
    whole = {"trained weights": p.trainable * trained_bytes, "gradients": p.breakdown.get("gradients", 0),
             "optimizer state": p.breakdown.get("optimizer state", 0),
             "optimizer temporaries": p.optimizer_temporaries}
    share = per_gpu(sharding, whole, largest_unit_parameters(family, denoiser),
                    2 if s.mixed_precision in ("fp16", "bf16") else 4)
    temporaries_saved = whole["optimizer temporaries"] - share.kept["optimizer temporaries"]
    steady = share.saved - temporaries_saved  # at every moment of the step; the temporaries at its optimizer step
    peak = max(0, p.peak - steady - temporaries_saved, min(p.peak, p.peak_before_optimizer) - steady)
    saved = {"step": p.peak - peak}  # what one GPU's step peak (and reserved memory) is lower by
    breakdown = dict(p.breakdown)
    breakdown["weights"] = breakdown.get("weights", 0) - whole["trained weights"] + share.kept["trained weights"]
    breakdown["gradients"] = share.kept["gradients"]
    breakdown["optimizer state"] = share.kept["optimizer state"]
    breakdown["gathered units"] = share.gathered
    breakdown["temporaries"] = breakdown.get("temporaries", 0) - temporaries_saved
    phases = {name: m if name in ("vae", "text") else  # before the denoiser comes to the device
              PhaseMemory(max(0, m.allocated - saved.get(name, steady)), max(0, m.reserved - saved.get(name, steady)))
              for name, m in p.phases.items()}
    kept = sum(v for k, v in share.kept.items() if k != "optimizer temporaries")
    held = sum(v for k, v in whole.items() if k != "optimizer temporaries")
    note = (f"{sharding.name()}: one GPU holds {kept / 2**30:.2f} GiB of the step's "
            f"{held / 2**30:.2f} GiB of trained weights, gradients and optimizer state, plus "
            f"{share.gathered / 2**30:.2f} GiB of gathered blocks"
            + (f"; the optimizer step's temporaries {whole['optimizer temporaries'] / 2**30:.2f} -> "
               f"{share.kept['optimizer temporaries'] / 2**30:.2f} GiB" if whole["optimizer temporaries"] else "")
            + (f"; {share.host / 2**30:.2f} GiB in host RAM per process" if share.host else ""))
    host = {**p.host, **({"offloaded shards": share.host} if share.host else {})}
    if sharding.engine == "fsdp2" and EMA in host:  # each process averages its own shards (library/sharded_ema.py)
        host[EMA] = -(-host[EMA] // sharding.processes)
    return dataclasses.replace(p, peak=peak, breakdown=breakdown, phases=phases,
                               notes=[*p.notes, note], host=host)
