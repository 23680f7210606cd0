"""Side streams and events on the run's device, for copies that overlap compute: CUDA's through torch.cuda (as
on every torch the project supports), any other accelerator's through torch's device-generic Stream and Event
(the tests' device, tests/fake_device.py); none on the CPU, where every copy is synchronous."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def side_stream(device) -> torch.Stream | None:
    """A new stream on `device` to copy on beside the compute stream; None on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return torch.cuda.Stream(device)
    return torch.Stream(torch.device(device.type, device.index or 0))


def current_stream(device) -> torch.Stream:
    """The stream `device`'s operators run on now (the compute stream)."""
    device = torch.device(device)
    return torch.cuda.current_stream(device) if device.type == "cuda" else torch.accelerator.current_stream(device)


def running_on(stream: torch.Stream | None):
    """`with running_on(stream):` the operators inside run on `stream` (as they are with None)."""
    if stream is None:
        return nullcontext()
    return torch.cuda.stream(stream) if isinstance(stream, torch.cuda.Stream) else stream


def recorded(stream: torch.Stream):
    """An event recorded on `stream` now: done once everything issued on it so far is."""
    event = torch.cuda.Event() if isinstance(stream, torch.cuda.Stream) else torch.Event(stream.device)
    event.record(stream)
    return event
