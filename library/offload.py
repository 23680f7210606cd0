"""Modules that visit the device one at a time: the frozen text encoders while captions are encoded for
cache_text_encoder_outputs. SD3 has three encoders (CLIP-L 0.25 GB, CLIP-G 1.4 GB, T5-XXL 9.5 GB in bf16);
with all three resident the encoding phase needs their sum, with one at a time only the largest.

A module comes to the device when its forward starts (its tensor arguments with it) and stays until another
of the set runs or the set is closed, like diffusers' enable_model_cpu_offload. Encoding runs in batches of
captions, so each encoder makes one round trip per batch, not per caption.

`visiting` does the same for sampling and class images, while the denoiser stays where training keeps it.

The planner (library/planner) counts the moves through library.memory.tell / OFFLOAD_OBSERVERS.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from library.devices import same_device
from library.memory import release_cached_blocks, tell


def _tell(module: nn.Module, where: str) -> None:
    for t in [*module.parameters(), *module.buffers()]:
        tell(t, where)


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


class OneAtATime:
    """with OneAtATime([clip_l, clip_g, t5], device): ... -- each on `device` only while it is the one running;
    all of them back on the host afterwards."""

    def __init__(self, modules: list[nn.Module], device, host="cpu"):
        self.modules, self.device, self.host = modules, torch.device(device), host
        self.resident: nn.Module | None = None
        self.handles: list = []

    def __enter__(self) -> "OneAtATime":
        for module in self.modules:
            module.to(self.host)
            _tell(module, "host")
            self.handles.append(module.register_forward_pre_hook(self._visit, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._leave()

    def _visit(self, module: nn.Module, args, kwargs):
        if self.resident is not module:
            self._leave()
            module.to(self.device)
            _tell(module, "module weights")
            self.resident = module
        return _to(args, self.device), _to(kwargs, self.device)

    def _leave(self) -> None:
        if self.resident is not None:
            self.resident.to(self.host)
            _tell(self.resident, "host")
            self.resident = None


@contextmanager
def visiting(visitors: list[nn.Module], device, worker: nn.Module):
    """`visitors` kept off the device (the VAE and the text encoders whose outputs are cached) come to it one at
    a time while `worker` (the denoiser, which stays where it is) samples: each arrives when it runs and the one
    before leaves then, and all leave when the worker runs (accelerate's model offload hooks, which the
    diffusers pipelines and the VAE's encode / decode honour); the cached blocks they leave go back to the card
    then (library.memory.release_cached_blocks). Visitors resident already stay."""
    from accelerate import cpu_offload_with_hook

    hooks, previous = [], None
    for module in visitors:
        if same_device(next(module.parameters()).device, device):
            continue  # resident for training already: it stays
        _, previous = cpu_offload_with_hook(module, torch.device(device), prev_module_hook=previous)
        hooks.append(previous)
    if hooks:
        hooks[0].hook.prev_module_hook = hooks[-1]  # the last one (the VAE, decoding) leaves for the next sample
    def all_leave(module, args) -> None:  # noqa: ARG001
        came = [h for h in hooks if same_device(next(h.model.parameters()).device, device)]
        for hook in hooks:
            hook.offload()
        if came:  # their blocks back to the card: the worker's activations do not fit in a text encoder's weights
            release_cached_blocks()

    handle = worker.register_forward_pre_hook(all_leave) if hooks else None
    try:
        yield
    finally:
        for hook in hooks:
            hook.offload()
            hook.remove()
        if handle is not None:
            handle.remove()
