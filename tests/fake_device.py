"""The test accelerator: a device that is not the host, on a CPU-only machine.

`fakegpu` is PyTorch's PrivateUse1 device, registered by a small C++ extension (tests/fake_device.cpp, built
with torch.utils.cpp_extension on first use, ~1 minute, then cached by torch in ~/.cache/torch_extensions).
Its memory is host memory from its own allocator; every operator runs the CPU kernel on that memory (no
copy), so results are the CPU's bit for bit and the golden losses hold on it. `use()` makes accelerate hand
it out the way it hands out CUDA: `accelerator.device` is `fakegpu` (no index), tensors report `fakegpu:0`.

It must be registered before the process's first backward (autograd sizes its per-device queues then):
tests/conftest.py loads it at collection when a test asks for the `gpu` fixture. `use()` also resets
accelerate's process state, which otherwise keeps the device of an earlier host run.

What it catches:
- a tensor left on the wrong side: an operator mixing host tensors (with dimensions) and device tensors
  raises "Expected all tensors to be on the same device", as on CUDA (0-dim host tensors pass, as on CUDA);
- comparisons of a device with and without an index (`fakegpu` != `fakegpu:0`, as `cuda` != `cuda:0`);
- bytes resident on the device at any moment (`resident_bytes()`, `peak_bytes()`): what stays, what leaks,
  what is brought to the device at once;
- host-device syncs: values read from the device (`value_reads()`: item(), bool(), float(), `if tensor`) and
  copies device -> host (`copies_to_host()`; `blocking_copies_to_host()`: those without non_blocking, for each
  of which the host waits), so that a test can count them per step;
- streams and events, through torch's device-generic API (`torch.Stream(device)`, `torch.Event`,
  `torch.accelerator.current_stream`): a copy device -> host with non_blocking on a side stream is deferred,
  as a GPU would still be running it, until something waits for it (an event recorded after it on that stream:
  `event.synchronize()` or another stream's `wait_event`; the stream; the next operator on that stream), so a
  host reader that forgets to wait reads stale memory; the events waited on are listed (`waited_events()`,
  by `torch.Event.event_id`).
- autocast / GradScaler paths that are keyed by "a device that is not the CPU".

What it cannot catch:
- anything keyed on the device *name* "cuda": code under `device.type == "cuda"` (torch.cuda's streams and
  events, pinned host memory, torch.cuda RNG, torch.cuda memory statistics) does not run on it; those paths
  keep their CPU-machine behaviour and need a CUDA machine (benchmarks/gpu_check.py);
- other asynchrony: every operator other than those deferred copies completes before it returns, so a race
  between streams on the device, or with a copy host -> device, cannot show; neither can the speed of
  anything;
- the CUDA caching allocator (reserved vs allocated, fragmentation, rounding): the counts are exact bytes
  of live storages;
- kernels that exist or differ only on CUDA (fp16/bf16 precision of cuBLAS, flash attention, xformers,
  bitsandbytes' CUDA kernels, fp8 matmuls): the CPU kernels run;
- device generators (`torch.Generator(device=...)`): seeded sampling uses host generators here.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import torch

NAME = "fakegpu"
_SOURCE = Path(__file__).with_name("fake_device.cpp")
_loaded = False


class _Backend:
    """torch.fakegpu: what torch, autocast and accelerate ask of a device module."""

    class device:  # noqa: N801  (torch.load restores a storage inside `torch.<backend>.device(index)`)
        def __init__(self, index) -> None:  # noqa: ARG002
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def set_device(device) -> None:  # noqa: ARG004
        return None

    @staticmethod
    def synchronize(device=None) -> None:  # noqa: ARG004
        torch.ops.fakegpu.synchronize()

    @staticmethod
    def current_stream(device=None) -> torch.Stream:  # torch.distributed.checkpoint's writer asks for it
        return torch.accelerator.current_stream(device)

    @staticmethod
    def stream(stream: torch.Stream) -> torch.Stream:
        return stream  # a torch.Stream is its own context: current inside, the previous one restored after

    @staticmethod
    def manual_seed(seed: int) -> None:  # noqa: ARG004
        return None

    @staticmethod
    def manual_seed_all(seed: int) -> None:  # noqa: ARG004
        return None

    @staticmethod
    def get_amp_supported_dtype() -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]

    @staticmethod
    def is_bf16_supported() -> bool:
        return True

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def memory_allocated(device=None) -> int:  # noqa: ARG004
        return resident_bytes()

    @staticmethod
    def max_memory_allocated(device=None) -> int:  # noqa: ARG004
        return peak_bytes()

    @staticmethod
    def max_memory_reserved(device=None) -> int:  # noqa: ARG004  (no caching allocator: reserved = allocated)
        return peak_bytes()

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:  # noqa: ARG004
        reset_peak()


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return True

    def has_primary_context(self, dev_id) -> bool:  # noqa: ARG002
        return True

    def is_built(self) -> bool:
        return True


def load() -> None:
    """Build (first time) and register the device; idempotent."""
    global _loaded
    if _loaded:
        return
    from torch.utils.cpp_extension import load as build

    digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]  # one cached build per source version
    build(name=f"fake_device_ext_{digest}", sources=[str(_SOURCE)], is_python_module=False, verbose=False,
          extra_cflags=["-O1"])
    torch.utils.rename_privateuse1_backend(NAME)
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
    torch._register_device_module(NAME, _Backend())
    torch._C._acc.register_python_privateuseone_hook(_Hooks())
    _loaded = True


def device(index: int | None = None) -> torch.device:
    return torch.device(NAME) if index is None else torch.device(NAME, index)


def resident_bytes() -> int:
    """Bytes held on the device now (every live storage, exactly)."""
    return torch.ops.fakegpu.resident_bytes()


def peak_bytes() -> int:
    """The most bytes held at once since the last reset_peak()."""
    return torch.ops.fakegpu.peak_bytes()


def reset_peak() -> None:
    torch.ops.fakegpu.reset_peak()


def value_reads() -> int:
    """Device values read by the host so far (item(), bool(), float(): each a sync on a GPU)."""
    return torch.ops.fakegpu.value_reads()


def copies_to_host() -> int:
    """Copies device -> host so far (each a sync on a GPU unless non_blocking into pinned memory)."""
    return torch.ops.fakegpu.copies_to_host()


def blocking_copies_to_host() -> int:
    """Copies device -> host without non_blocking so far: the host waits for each."""
    return torch.ops.fakegpu.blocking_copies_to_host()


def deferred_copies() -> int:
    """Copies device -> host on a side stream that nothing has waited for yet."""
    return torch.ops.fakegpu.deferred_copies()


def waited_events() -> list[int]:
    """The events waited on so far (by the host or by a stream), as torch.Event.event_id names them, in order."""
    return list(torch.ops.fakegpu.waited_events())


def host_waits() -> int:
    """Times the host waited for the device: event.synchronize(), stream.synchronize(), synchronize()."""
    return torch.ops.fakegpu.host_waits()


def on_device(tensor: torch.Tensor) -> bool:
    return tensor.device.type == NAME


@contextmanager
def use():
    """accelerate hands out the test device for runs started inside (as it hands out `cuda`)."""
    load()
    before = os.environ.get("ACCELERATE_TORCH_DEVICE")
    os.environ["ACCELERATE_TORCH_DEVICE"] = NAME
    _reset_accelerate()  # accelerate keeps the device it chose for the process (PartialState)
    try:
        yield device()
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
        else:
            os.environ["ACCELERATE_TORCH_DEVICE"] = before
        _reset_accelerate()


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
