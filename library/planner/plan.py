"""A plan: the memory of a config's phases, measured on fake tensors (library/planner/step.py) and replayed
through the caching-allocator model (library/planner/allocator.py) for the card (library/planner/card.py)."""
from __future__ import annotations

import dataclasses
import time

from library.planner.allocator import PhaseMemory, replay
from library.planner.card import Card
from library.planner.sharding import sharded_plan
from library.planner.step import StepSettings, measure_step
from library.planner.tracker import Record

GIB = 2**30
# a run's phases, in its order: class images (train_db's prior preservation), VAE latents, text encoders, the
# training step, sampling, saving
PHASES = ("class images", "vae", "text", "step", "sample", "save")
SAVING = "saving: "  # the host entries that exist only while a file is written


@dataclasses.dataclass
class Plan:
    settings: StepSettings
    peak: int  # bytes the tensors hold at the peak of the training step
    breakdown: dict[str, int]
    vae_peak: int
    text_peak: int
    notes: list[str]
    seconds: float
    trainable: int = 0
    phases: dict[str, PhaseMemory] = dataclasses.field(default_factory=dict)  # as the allocator counts them
    card: Card = dataclasses.field(default_factory=Card)
    host: dict = dataclasses.field(default_factory=dict)  # host RAM the run holds while training, by what
    # the optimizer step's own temporaries alive at the step's peak (foreach kernels' per-step lists, the
    # clipping's norms), and the step's peak before the optimizer step: what sharding divides (sharding.py)
    optimizer_temporaries: int = 0
    peak_before_optimizer: int = 0

    @property
    def device_peak(self) -> int:
        """The largest of the training step and the pre-encoding phases: bytes in tensors."""
        return max(self.peak, self.vae_peak, self.text_peak)

    @property
    def reserved_peak(self) -> int:
        """What torch.cuda.max_memory_reserved will say at the end of the run."""
        return max((m.reserved for m in self.phases.values()), default=self.device_peak)

    @property
    def card_peak(self) -> int:
        """What the card shows at the worst moment (nvidia-smi): reserved + the CUDA context."""
        return self.reserved_peak + self.card.context

    def card_total(self, phase: str) -> int:
        return self.phases[phase].reserved + self.card.context

    @property
    def host_training(self) -> int:
        """Host RAM the run holds while training (parts kept on the CPU, block swap, EMA)."""
        return sum(v for k, v in self.host.items() if not k.startswith(SAVING))

    @property
    def host_peak(self) -> int:
        """Host RAM at the run's worst moment: what training holds plus a file's tensors while it is written."""
        return sum(self.host.values())


def plan(settings: StepSettings, fake: bool = True, card: Card | None = None) -> Plan:
    card = card or Card()
    started = time.perf_counter()
    m = measure_step(settings, fake=fake)
    step = m.phases["step"]
    spans, releases = dict(m.tracker.spans), m.tracker.releases
    last = spans["step"][1]
    records, spans["step"] = bucket_steps(m.tracker.records, spans["step"], settings.bucket_areas)
    added = spans["step"][1] - last  # the later phases come after the repeated steps
    if added:
        spans = {k: (a + added, b + added) if a >= last and k != "step" else (a, b) for k, (a, b) in spans.items()}
        releases = [c + added if c > last else c for c in releases]
    phases = replay(records, min(first for first, _ in spans.values()), spans, [card.cublas_workspace], releases)
    phases = {name: phases[name] for name in PHASES if name in phases}
    measured = Plan(settings, step.bytes, step.breakdown(m.tracker.records), m.phases["vae"].bytes,
                    m.phases["text"].bytes, m.notes, time.perf_counter() - started, m.trainable, phases, card, m.host,
                    *optimizer_step_share(m.tracker.records, step.clock, m.tracker.spans["step"]))
    return sharded_plan(measured)  # one GPU of N under ZeRO / FSDP2 (library/planner/sharding.py)


def optimizer_step_share(records: list[Record], peak_clock: int, span: tuple[int, int]) -> tuple[int, int]:
    """(bytes of the optimizer step's temporaries alive at the step's peak: storages of no other category made
    in its "optimizer" phase; the step's peak before the optimizer step began: the most bytes alive at any
    moment of the step before its first such storage)."""
    first, last = span
    temporaries = [r for r in records if r.category is None and r.phase == "optimizer" and first < r.born <= last]
    at_peak = sum(r.nbytes for r in temporaries if r.born <= peak_clock and (r.died is None or r.died > peak_clock))
    start = min((r.born for r in temporaries), default=last + 1)
    changes: dict[int, int] = {}
    for r in records:
        if r.born < start and (r.died is None or r.died > first):
            changes[max(r.born, first)] = changes.get(max(r.born, first), 0) + r.nbytes
            if r.died is not None and r.died < start:
                changes[r.died] = changes.get(r.died, 0) - r.nbytes
    current = before = 0
    for clock in sorted(changes):
        current += changes[clock]
        before = max(before, current)
    return at_peak, before


def bucket_steps(records: list[Record], span: tuple[int, int], areas: tuple[float, ...]):
    """The measured step, followed by steps at other bucket sizes and then the measured size again, for the
    allocator replay: what lived and died inside the step is repeated, its activations and temporaries scaled
    by each bucket's area over the planned one (weights, gradients and state keep their size). Blocks cached
    for one bucket's tensors and split for the next one's are the fragmentation bucketed training shows.
    Returns (records, the span of all those steps)."""
    if not areas:
        return records, span
    first, last = span
    inside = [r for r in records if first < r.born and r.died is not None and r.died <= last]
    added = (len(areas) + 1) * (last - first)
    out = [r if r.born <= last and (r.died is None or r.died <= last) else  # what comes after: later
           dataclasses.replace(r, born=r.born + added if r.born > last else r.born,
                               died=r.died + added if r.died is not None and r.died > last else r.died)
           for r in records]
    for n, area in enumerate((*areas, 1.0), 1):
        shift = n * (last - first)
        for r in inside:
            size = r.nbytes if r.category else max(1, round(r.nbytes * area))
            out.append(Record(size, r.born + shift, r.phase, r.died + shift, r.category, r.stream))
    return out, (first, last + added)
