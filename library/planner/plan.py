"""A plan: the memory of a config's phases, measured on fake tensors (library/planner/step.py) and replayed
through the caching-allocator model (library/planner/allocator.py) for the card (library/planner/card.py)."""
from __future__ import annotations

import dataclasses
import time

from library.planner.allocator import PhaseMemory, replay
from library.planner.card import Card
from library.planner.step import StepSettings, measure_step

GIB = 2**30


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


def plan(settings: StepSettings, fake: bool = True, card: Card | None = None) -> Plan:
    card = card or Card()
    started = time.perf_counter()
    m = measure_step(settings, fake=fake)
    step = m.phases["step"]
    spans = m.tracker.spans
    phases = replay(m.tracker.records, spans["vae"][0], spans, [card.cublas_workspace])
    return Plan(settings, step.bytes, step.breakdown(m.tracker.records), m.phases["vae"].bytes,
                m.phases["text"].bytes, m.notes, time.perf_counter() - started, m.trainable, phases, card)
