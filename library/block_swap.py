"""The block swapper (train.blocks_to_swap): N of the denoiser's blocks keep their weights in host memory
(pinned when the device is CUDA) and come to the device just in time for their forward, and for the
forward that backward re-runs under gradient checkpointing; they go back to the host after use.

Which blocks (family.blocks_to_swap): N as sd-scripts counts them (FLUX.1: N // 2 double- and (N - N // 2) * 2
single-stream blocks, families/flux.py; SD3: N joint blocks), each kind evenly spread, so that the copy of the
next swapped block (a prefetch, on a side CUDA stream) overlaps with the compute of the blocks in between. On the CPU
the copies are plain, synchronous, but still separate storages, so tests exercise the same mechanism.

What moves: the block's frozen weights; in full fine-tuning (`trained=True`) its trained weights too, with
their optimizer state. An adapter's weights (LoRA) stay on the device. A quantized base's bitsandbytes layers
(base_model_precision int8 / nf4) move with their quant state, which bitsandbytes keeps outside parameters and
buffers (library.quantization.quant_state_slots): nf4's block absmax and code tables, int8's row scales.

When, with gradient checkpointing (required: without it autograd would keep every block's device weights
for backward, so nothing would leave the device):
- forward: before block k, its weights arrive (waiting for the prefetch) and the next swapped block's
  copy starts; after block k, its device copies are dropped (the host copies are current).
- backward: checkpointing re-runs block k's forward (the same hooks) right before block k's backward. Its
  weights and optimizer state arrive then; they leave when the next block's re-run starts (autograd runs
  the blocks' backward one after another, last to first, and steps a weight's optimizer - the fused
  backward pass - as soon as its gradient is complete), or at the end of backward. So a trained weight is
  updated while on the device; what leaves is the updated weight (copied back) and its optimizer state.
  This needs the per-parameter fused backward pass (optimizer.fused_backward_pass): an optimizer that
  steps after backward would find the weights on the host.

At most two swapped blocks are on the device at a time (the one running and the one prefetched).

The write-back (a trained weight and its optimizer state, device -> host) runs on the same side stream without
the host waiting for it (non_blocking into the pinned slabs), so that backward goes on computing the earlier
blocks meanwhile; one event is recorded after each block's copies. Until that event is done the host copies
are not current: every reader waits for it first. The block's next load is queued after it on the device;
readers on the host (saving, checkpoints, EMA, the tests) call `settle_all()` (or a swapper's `settle()`), as
`remove()` does. On the CPU there is no stream and the copies are plain, synchronous.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from library.devices import on, same_device
from library.memory import HostSlabs, device_copy, tell
from library.quantization import quant_state_slots, tie_int8_state
from library.streams import current_stream, recorded, running_on, side_stream

_LIVE: weakref.WeakSet = weakref.WeakSet()  # every swapper of this process, for settle_all()


def settle_all() -> None:
    """Wait (the host) for every block swapper's write-backs in flight: afterwards the host copies of all
    swapped weights and their optimizer state are current. Whatever reads them on the host calls this first."""
    for swapper in list(_LIVE):
        swapper.settle()


def spread(total: int, count: int) -> list[int]:
    """`count` of `total` block indices, evenly spread (all of them when count == total)."""
    return sorted({round(i * total / count + (total / count - 1) / 2) for i in range(count)})


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockSwapper:
    def __init__(self, blocks: list[nn.Module], count: int, device, trained: bool = False, optimizer_state=None):
        """blocks: in execution order; count: how many swap; device: where they compute; trained: their
        trained weights swap too (full fine-tune); optimizer_state: param -> its optimizer's state dict."""
        if not 0 < count <= len(blocks):
            raise ValueError(f"blocks_to_swap = {count}: this model has {len(blocks)} swappable blocks")
        self.device = torch.device(device)
        self.blocks = blocks
        self.swapped = spread(len(blocks), count)
        self.trained = trained
        self.optimizer_state = optimizer_state
        self.weights: dict[int, list[nn.Parameter]] = {}
        self.host: dict[nn.Parameter, torch.Tensor] = {}  # the host copy of every swapped weight
        self.state_host: dict[tuple[int, str], torch.Tensor] = {}  # (id(param), key) -> host buffer
        self.loaded: dict[int, torch.Event | None] = {}  # swapped blocks on the device -> their load's event
        self.writing: dict[int, torch.Event] = {}  # blocks written back -> the event after their copies
        self.stream = side_stream(self.device)  # the copies' (None on the CPU)
        self.loads = 0  # blocks brought to the device so far (tests, logging)
        self.most_resident = 0  # the largest number of swapped blocks on the device at once
        self._settle_queued = False
        self._handles = []
        self._ids = set()
        self.quant: dict[int, list[tuple[object, str]]] = {}  # block -> its quantized layers' state slots
        self.quant_host: dict[tuple[int, str], torch.Tensor] = {}  # (id(owner), attribute) -> host copy
        for k in self.swapped:
            self.weights[k] = [p for p in blocks[k].parameters() if trained or not p.requires_grad]
            self.quant[k] = [slot for m in blocks[k].modules() for slot in quant_state_slots(m)]
        # the host copies (and the optimizer state's) in pinned slabs: no power-of-two rounding per tensor
        self.slabs = HostSlabs(self.device.type == "cuda", sum(t.numel() * t.element_size()
                                                               for k in self.swapped for t in self._tensors(k)))
        for k in self.swapped:
            self._ids.update(id(p) for p in self.weights[k])
            for p in self.weights[k]:
                self.host[p] = self.slabs.copy(p.data)  # the model is still on the CPU
                p.data = self.host[p]
            for owner, name in self.quant[k]:
                self.quant_host[(id(owner), name)] = self.slabs.copy(getattr(owner, name))
            self._put_quant_state(k, self.quant_host.__getitem__)
            self._handles.append(blocks[k].register_forward_pre_hook(self._before(k)))
            self._handles.append(blocks[k].register_forward_hook(self._after(k), always_call=True))
        _LIVE.add(self)

    # ---- the hooks ------------------------------------------------------------------------------
    def _before(self, k: int):
        def hook(module, args):  # noqa: ARG001
            backward = _in_backward()
            if backward:
                for other in [j for j in self.loaded if j > k]:  # their backward (and optimizer steps) are done
                    self._offload(other, stepped=True)
                if not self._settle_queued:
                    self._settle_queued = True
                    torch.autograd.Variable._execution_engine.queue_callback(self._settle)
            self._load(k, backward)
            self._use(k)
            position = self.swapped.index(k)
            following = position - 1 if backward else position + 1
            if 0 <= following < len(self.swapped):
                self._load(self.swapped[following], backward)
        return hook

    def _after(self, k: int):
        def hook(module, args, output):  # noqa: ARG001
            if not _in_backward():  # in backward the block leaves when its backward is done (see above)
                self._offload(k)
        return hook

    def _settle(self) -> None:
        self._settle_queued = False
        for k in list(self.loaded):
            self._offload(k, stepped=True)

    # ---- moving ---------------------------------------------------------------------------------
    def _tensors(self, k: int) -> list[torch.Tensor]:
        """Block k's swapped tensors as they are now: weights, then quant state."""
        return [p.data for p in self.weights[k]] + [getattr(owner, name) for owner, name in self.quant[k]]

    def _put_quant_state(self, k: int, tensor_for) -> None:
        """Block k's quant state set to tensor_for((id(owner), attribute)); int8 states follow their data."""
        for owner, name in self.quant[k]:
            setattr(owner, name, tensor_for((id(owner), name)))
        for module in self.blocks[k].modules():
            tie_int8_state(module)

    def _load(self, k: int, with_state: bool) -> None:
        if k in self.loaded:
            return
        stream = self.stream
        if stream is not None:
            stream.wait_stream(current_stream(self.device))
            written = self.writing.get(k)  # kept for the host's readers: this wait is the device's
            if written is not None:  # the block's write-back, queued on this stream before: done first
                stream.wait_event(written)
        with running_on(stream):
            for p in self.weights[k]:
                p.data = device_copy(self.host[p], self.device, non_blocking=stream is not None)
                if with_state and p.requires_grad and self.optimizer_state is not None:
                    state = self.optimizer_state(p)
                    for key, value in list(state.items()):  # the host buffers, or a state resumed on the host
                        if isinstance(value, torch.Tensor) and value.dim() > 0 and not on(value, self.device):
                            state[key] = device_copy(value, self.device, "optimizer state",
                                                     non_blocking=stream is not None)
            self._put_quant_state(k, lambda slot: device_copy(self.quant_host[slot], self.device,
                                                              non_blocking=stream is not None))
        self.loaded[k] = recorded(stream) if stream is not None else None
        self.loads += 1
        self.most_resident = max(self.most_resident, len(self.loaded))

    def _use(self, k: int) -> None:
        """The compute stream waits for block k's copies (and owns them from now on)."""
        event = self.loaded[k]
        if event is None:
            return
        current = current_stream(self.device)
        current.wait_event(event)
        for tensor in self._tensors(k):
            tensor.record_stream(current)
        self.loaded[k] = None

    def _offload(self, k: int, stepped: bool = False) -> None:
        """Block k's device copies are dropped; `stepped` (after its backward): trained weights and their
        optimizer state are written back to the host first."""
        self._use(k)
        del self.loaded[k]
        trained = [p for p in self.weights[k] if p.requires_grad] if stepped else []
        if trained:
            self._write_back(k, trained)
        for p in self.weights[k]:
            p.data = self.host[p]
        self._put_quant_state(k, self.quant_host.__getitem__)

    def _write_back(self, k: int, params: list[nn.Parameter]) -> None:
        """The stepped weights and their optimizer state copied into their host buffers: on the side stream,
        after the compute stream's work so far (the optimizer steps), without the host waiting; the event
        recorded after them is what readers wait for (settle)."""
        stream = self.stream
        if stream is not None:
            stream.wait_stream(current_stream(self.device))
        with running_on(stream):
            for p in params:
                self._copy_back(p.data, self.host[p])
                if self.optimizer_state is None:
                    continue
                state = self.optimizer_state(p)
                for key, value in list(state.items()):
                    if isinstance(value, torch.Tensor) and on(value, self.device) and value.dim() > 0:
                        buffer = self.state_host.get((id(p), key))
                        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                            buffer = self.slabs.take(value.shape, value.dtype)
                        state[key] = self.state_host[(id(p), key)] = self._copy_back(value, buffer)
        if stream is not None:
            self.writing[k] = recorded(stream)

    def _copy_back(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out.copy_(tensor, non_blocking=self.stream is not None)
        if self.stream is not None:
            tensor.record_stream(self.stream)  # its device memory is not reused before the copy is done
        tell(out, "host")
        return out

    def settle(self, k: int | None = None) -> None:
        """Wait (the host) until block k's write-back is done (every block's when None): then the host copies of
        its weights and optimizer state are current."""
        for j in [k] if k is not None else list(self.writing):
            event = self.writing.pop(j, None)
            if event is not None:
                event.synchronize()

    # ---- for the recipes ------------------------------------------------------------------------
    def place(self, module: nn.Module) -> None:
        """Move `module` (the denoiser) to the device, except the swapped weights, which stay on the host."""
        for p in module.parameters():
            if not self.swaps(p):
                p.data = p.data.to(self.device)
        for sub in module.modules():
            for name, buffer in sub._buffers.items():
                if buffer is not None:
                    sub._buffers[name] = buffer.to(self.device)
            weight = sub._parameters.get("weight")
            if weight is not None and not self.swaps(weight):  # a kept quantized layer's state comes too
                for owner, name in quant_state_slots(sub):
                    setattr(owner, name, getattr(owner, name).to(self.device))
                tie_int8_state(sub)

    def swaps(self, param: torch.Tensor) -> bool:
        """Whether `param` is one of the swapped weights (on the host between uses)."""
        return id(param) in self._ids

    def resident(self) -> list[int]:
        """The swapped blocks whose weights are on the device now."""
        return sorted(self.loaded)

    def bytes_swapped(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.host.values(), *self.quant_host.values()])

    def host_ram(self) -> int:
        """Host memory the swapped weights (and their optimizer state, once it exists) hold, as allocated."""
        return self.slabs.host_bytes()

    def remove(self) -> None:
        """The hooks removed, once the write-backs in flight are done (the weights stay where they are)."""
        self.settle()
        for handle in self._handles:
            handle.remove()
        _LIVE.discard(self)

    def __enter__(self) -> "BlockSwapper":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def move(module: nn.Module, device) -> None:
    """module.to(device), except that a denoiser with blocks_to_swap keeps its swapped weights on the host
    (the recipes, and sampling, move the denoiser with this)."""
    swapper = getattr(module, "_block_swapper", None)
    if swapper is None or not same_device(device, swapper.device):
        module.to(device)
    else:
        swapper.place(module)


def make_swapper(family, parts, count: int | None, device, trained: bool = False, optimizer_state=None):
    """The swapper for train.blocks_to_swap (None when 0 / unset)."""
    if not count:
        return None
    if not family.swappable_blocks(parts):
        from library.config import ConfigError

        raise ConfigError(f"train.blocks_to_swap: the {family.name} family has no swappable blocks (SD3 / FLUX.1)")
    blocks = family.blocks_to_swap(parts, count)
    swapper = BlockSwapper(blocks, len(blocks), device, trained, optimizer_state)
    parts.denoiser._block_swapper = swapper  # for move()
    return swapper
