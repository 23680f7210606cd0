"""The phases of a run (loading, caching, class images, training, sampling, saving): which one is running, for
the message of a GPU out-of-memory error (library/cli.py), and each one's peak device memory, allocated and
reserved, for the report at the end of the run.

A run names its main phase with `enter` ("training"); the work that interrupts it (sampling, saving) runs
`during` a phase of its own, after which the main phase goes on. The device's peak counters are read and
reset at every change, so each phase's peak is its own: the largest over its stretches of time.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch

OOM_HINT = ("see what each switch saves with --plan (or --vram_budget GB for the switches that fit), and set "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation")


@dataclass
class Peak:
    allocated: int = 0  # bytes
    reserved: int = 0  # bytes the allocator held (allocated + its cache)


class _Run:
    def __init__(self) -> None:
        self.device: torch.device | None = None
        self.stack: list[str] = ["loading"]
        self.peaks: dict[str, Peak] = {}


_run = _Run()


def start(device) -> None:
    """A new run computing on `device`: the peaks start from zero, the phase is "loading"."""
    global _run
    _run = _Run()
    _run.device = torch.device(device)
    _reset_counters()


def enter(name: str) -> None:
    """The run's main phase is now `name` (one line in a recipe: `phases.enter("training")`)."""
    _close_stretch()
    _run.stack[0] = name


@contextmanager
def phase(name: str):
    """`name` runs inside the main phase; an out-of-memory error raised in it is marked with it."""
    _close_stretch()
    _run.stack.append(name)
    try:
        yield
    except torch.OutOfMemoryError as e:
        e.phase = getattr(e, "phase", None) or name  # the innermost phase names it
        raise
    finally:
        _close_stretch()
        _run.stack.pop()


def during(name: str):
    """A function that runs as phase `name` (sampling, saving, caching, class images)."""
    def wrap(function):
        @functools.wraps(function)
        def run(*args, **kwargs):
            with phase(name):
                return function(*args, **kwargs)
        return run
    return wrap


def failed_in(error: BaseException) -> str:
    """The phase an out-of-memory error came from."""
    return getattr(error, "phase", None) or _run.stack[-1]


def peaks() -> dict[str, Peak]:
    """Each phase's peak so far (the running one included)."""
    _close_stretch()
    return dict(_run.peaks)


def report() -> str | None:
    """'peak GPU memory (allocated / reserved): loading 1.20 / 1.25 GiB, ...', or None off an accelerator."""
    if _backend() is None:
        return None
    found = peaks()
    return "peak GPU memory (allocated / reserved): " + ", ".join(
        f"{name} {p.allocated / 2**30:.2f} / {p.reserved / 2**30:.2f} GiB" for name, p in found.items())


def for_trackers() -> dict[str, float]:
    """The peaks as tracker values (GiB): memory/<phase>/allocated_gib, .../reserved_gib."""
    return {f"memory/{name}/{kind}_gib": getattr(p, kind) / 2**30 for name, p in peaks().items()
            for kind in ("allocated", "reserved")}


def _backend():
    """The device's module (torch.cuda, ...) when it counts peaks; None on the CPU."""
    device = _run.device
    if device is None or device.type == "cpu":
        return None
    module = torch.get_device_module(device)
    return module if getattr(module, "reset_peak_memory_stats", None) is not None else None


def _close_stretch() -> None:
    """What the running phase used since the last change goes to its peak; the counters start again."""
    backend = _backend()
    if backend is None:
        return
    name = _run.stack[-1]
    peak = _run.peaks.setdefault(name, Peak())
    peak.allocated = max(peak.allocated, backend.max_memory_allocated(_run.device))
    peak.reserved = max(peak.reserved, backend.max_memory_reserved(_run.device))
    _reset_counters()


def _reset_counters() -> None:
    backend = _backend()
    if backend is not None:
        backend.reset_peak_memory_stats(_run.device)
