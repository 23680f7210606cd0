"""Memory switches: precision of frozen and trainable weights (fp8_base), gradient checkpointing (with the
checkpointed inputs on the CPU: cpu_offload_checkpointing), attention backend; and the copies between the
device and the host that offloading makes (block swap: library/block_swap.py)."""
from __future__ import annotations

import torch
from torch import nn

from library.streams import current_stream, recorded, running_on, side_stream

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are stored in: half precision when training in mixed precision."""
    return DTYPES[mixed_precision]


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter and buffer in `dtype`; trainable parameters are left as they are."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(dtype)


def cast_frozen_parts(parts, dtype: torch.dtype, no_half_vae: bool) -> None:
    """cast_frozen on every part: frozen weights in `dtype`, the VAE in fp32 with no_half_vae (the SDXL VAE's
    fp16 NaNs)."""
    for module in [parts.denoiser, parts.vae, *parts.text_encoders.values()]:
        cast_frozen(module, torch.float32 if module is parts.vae and no_half_vae else dtype)


def cast_trainable(params: list[nn.Parameter], dtype: torch.dtype) -> None:
    for param in params:
        param.data = param.data.to(dtype)


def set_attention(denoiser: nn.Module, xformers: bool, sdpa: bool) -> str:
    """xformers when asked (checked installed by the config), else PyTorch SDPA, else plain attention."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    processors = [m.processor for m in denoiser.modules() if isinstance(m, Attention)]
    if not processors or any(_joint(p) or type(p).__module__ != AttnProcessor.__module__ for p in processors):
        # FLUX / SD3 / Qwen-Image (joint attention), Z-Image (its model's own single-stream processor): already SDPA
        return f"sdpa{sdpa_kernels()} (the model's own attention processors)"
    if xformers:
        denoiser.enable_xformers_memory_efficient_attention()
        return "xformers"
    denoiser.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
    return f"sdpa{sdpa_kernels()}" if sdpa else "math"


def sdpa_kernels() -> str:
    """Which kernels PyTorch's SDPA may pick from on this machine (it picks per call, by dtype, shape and GPU:
    flash attention needs fp16 / bf16), for the run's report."""
    if not torch.cuda.is_available():
        return " (CPU kernels)"
    b = torch.backends.cuda
    kernels = (("flash", b.flash_sdp_enabled()), ("memory-efficient", b.mem_efficient_sdp_enabled()),
               ("cuDNN", b.cudnn_sdp_enabled()), ("math", b.math_sdp_enabled()))
    enabled = [name for name, on in kernels if on]
    return f" (CUDA kernels: {', '.join(enabled)}; flash needs fp16 / bf16)"


def compile_blocks(denoiser: nn.Module, wanted: bool, backend: str) -> int:
    """torch_compile: each repeated block of the denoiser compiled in place (nn.Module.compile: its weights, names
    and hooks stay as they are), the blocks diffusers declares as repeated (`_repeated_blocks`), else the members
    of the denoiser's block lists. Returns how many blocks were compiled (0 when off)."""
    if not wanted or backend == "no":
        return 0
    kinds = getattr(denoiser, "_repeated_blocks", None) or ()
    blocks = ([m for m in denoiser.modules() if type(m).__name__ in kinds] if kinds else
              [m for child in denoiser.children() if isinstance(child, nn.ModuleList) for m in child])
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def _joint(processor) -> bool:
    """A joint (text + image) attention processor of the model's own, which the generic ones cannot replace."""
    return any(word in type(processor).__name__ for word in ("Joint", "DoubleStream"))


def enable_gradient_checkpointing(denoiser: nn.Module, text_encoders: list[nn.Module]) -> None:
    denoiser.enable_gradient_checkpointing()
    for encoder in text_encoders:
        encoder.gradient_checkpointing_enable()


def store_fp8_base(denoiser: nn.Module, compute_dtype: torch.dtype) -> int:
    """fp8_base: the frozen denoiser's Linear / Conv weights in float8 (store_fp8), as sd-scripts' fp8_base
    stores its frozen base model. Inside a peft adapter layer the frozen base layer is stored so; the adapter's
    own modules (`lora_A.default`, ...) are not: they stay in their precision, trainable."""
    from networks.algorithms import ADAPTER

    return store_fp8(denoiser, compute_dtype, skip=lambda name, _: name.rsplit(".", 1)[-1] == ADAPTER,
                     what="fp8_base")


def store_fp8(module: nn.Module, compute_dtype: torch.dtype, skip=lambda name, layer: False,
              what: str = "fp8 storage") -> int:
    """Every frozen weight of `module`'s Linear / Conv / Embedding layers (the layer classes diffusers'
    layerwise casting handles), except layers `skip(name, layer)` names, stored as float8_e4m3fn and cast to
    `compute_dtype` layer by layer in forward. Norm weights and other parameters stay as they are. Returns the
    number of layers in fp8. A layer given a ComfyUI fp8-scaled file's own float8 weight and scale
    (library.fp8_scaled.attach) stores those bytes as they are and computes weight.to(dtype) * scale.to(dtype),
    as ComfyUI's scaled-fp8 layers do.

    Like diffusers' LayerwiseCastingHook, but the fp8 parameter is kept and put back after forward instead of
    cast back with module.to(): no second cast, no new storage per forward, and no weight whose dtype changes
    under autograd's feet (a Conv saves its weight tensor itself for backward; module.to() also cannot run
    on the planner's fake tensors once autograd holds the weight). The compute-dtype copies are transient:
    with gradient checkpointing one block's copies exist at a time; without it autograd keeps every layer's
    copy for backward, so little is saved."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    layers = [m for name, m in module.named_modules()
              if isinstance(m, _GO_LC_SUPPORTED_PYTORCH_LAYERS) and not skip(name, m)]
    for layer in layers:
        names = [name for name, _ in layer.named_parameters(recurse=False)]
        if any(getattr(layer, name).requires_grad for name in names):
            raise ValueError(f"{what} stores frozen weights; a {type(layer).__name__} of {type(module).__name__} "
                             f"trains")
        scales = _store_layer_fp8(layer, names, compute_dtype)
        kept: dict[str, nn.Parameter] = {}

        # the fp8 parameter leaves its slot to a compute-dtype copy for the forward (a separate tensor, so what
        # autograd saves of it stays that copy), and comes back after
        def cast(module, args, names=names, kept=kept, scales=scales):  # noqa: ARG001
            for name in names:
                kept[name] = module._parameters[name]
                copy = kept[name].detach().to(compute_dtype)
                module._parameters[name] = copy * scales[name] if name in scales else copy

        def restore(module, args, output, kept=kept):  # noqa: ARG001
            for name, param in list(kept.items()):
                module._parameters[name] = param
            kept.clear()

        layer.register_forward_pre_hook(cast)
        layer.register_forward_hook(restore, always_call=True)
    return len(layers)


def _store_layer_fp8(layer: nn.Module, names: list[str], compute_dtype: torch.dtype) -> dict[str, float]:
    """The layer's parameters `names` in float8: a ComfyUI fp8-scaled file's own weight where attach() gave one
    (its scale, rounded to `compute_dtype` as ComfyUI rounds it, returned by name), else rounded to
    float8_e4m3fn."""
    from library.fp8_scaled import KEPT

    scaled = layer.__dict__.pop(KEPT, None)
    scales = {}
    for name in names:
        param = getattr(layer, name)
        if name == "weight" and scaled is not None:
            param.data = scaled[0].to(param.device)
            scales[name] = float(scaled[1].to(compute_dtype))
        else:
            param.data = param.data.to(torch.float8_e4m3fn)
    return scales


# ---- copies between the device and the host (offloading) -----------------------------------------------

# callables(tensor, where): where = "host" (this storage now lives in host memory) or the category of a tensor
# that came to the device: on block swap's side stream ("weights", "optimizer state") or on the compute stream
# ("activations"; "module weights": a whole module moved over, library/offload.py). (None, "empty_cache"): the
# caching allocator's unused segments were given back. The planner listens, to count them.
OFFLOAD_OBSERVERS: list = []


def tell(tensor: torch.Tensor | None, where: str) -> None:
    """Report a move to OFFLOAD_OBSERVERS (see above)."""
    for observer in OFFLOAD_OBSERVERS:
        observer(tensor, where)


def release_cached_blocks() -> None:
    """torch.cuda.empty_cache at a phase boundary (before and after sampling): the segments the last phase
    cached and no tensor uses go back to the card, so the next phase's tensors are not laid out beside them
    (and the card shows less). The next training step reserves its own again (a few cudaMalloc calls)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    tell(None, "empty_cache")


def host_copy(tensor: torch.Tensor, out: torch.Tensor | None = None, pin: bool | None = None) -> torch.Tensor:
    """A copy of `tensor` in host memory, pinned (for fast asynchronous copies to and from the GPU) when `pin`,
    by default when it comes from CUDA; always a separate storage (also when the "device" is the CPU, so that
    tests exercise the mechanism); `out`: an existing host buffer to copy into."""
    if out is None:
        pin = tensor.device.type == "cuda" if pin is None else pin and torch.cuda.is_available()
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
    out.copy_(tensor)
    tell(out, "host")
    return out


class HostSlabs:
    """Host memory for many tensors in few large buffers, pinned when `pin` (CUDA): PyTorch's pinned-memory
    allocator rounds every allocation up to a power of two (a 75 MB tensor takes 128 MB: ~1.5x over a FLUX
    block's weights), so the tensors are views into slabs whose size is a power of two already. A tensor larger
    than a slab gets its own allocation (rounded so); host_bytes() is what the allocator really holds."""

    ALIGN = 512  # bytes: every view starts aligned for any dtype and for DMA
    SLAB = 2**28  # 256 MiB

    def __init__(self, pin: bool, expected_bytes: int = 0):
        self.pin = pin and torch.cuda.is_available()
        self.slab = min(self.SLAB, _power_of_two(expected_bytes)) if expected_bytes else self.SLAB  # small models
        self.buffers: list[torch.Tensor] = []  # uint8 slabs and single allocations
        self.free: list[list] = []  # [slab, bytes used] of the slabs

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor of `shape` and `dtype`, a view into a slab."""
        size = torch.Size(shape).numel() * dtype.itemsize
        need = -(-max(size, 1) // self.ALIGN) * self.ALIGN
        if need > self.slab:
            buffer = self._allocate(_power_of_two(need))
            return buffer[:size].view(dtype).view(shape)
        place = next((entry for entry in self.free if entry[1] + need <= self.slab), None)
        if place is None:
            place = [self._allocate(self.slab), 0]
            self.free.append(place)
        start, place[1] = place[1], place[1] + need
        return place[0][start:start + size].view(dtype).view(shape)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        out = self.take(tensor.shape, tensor.dtype)
        out.copy_(tensor)
        tell(out, "host")
        return out

    def host_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def _allocate(self, size: int) -> torch.Tensor:
        buffer = torch.empty(size, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
        self.buffers.append(buffer)
        return buffer


def _power_of_two(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def device_copy(tensor: torch.Tensor, device: torch.device, category: str = "weights",
                non_blocking: bool = False) -> torch.Tensor:
    """A copy of a host tensor on `device` (a separate storage even when `device` is the CPU)."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    out.copy_(tensor, non_blocking=non_blocking)
    tell(out, category)
    return out


def host_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict() in host memory, tensor by tensor: what a file is built from (fusing or reshaping
    device tensors would build a second copy of them on the device). Separate storages told to the observers
    (host_copy, pageable: a save is one pass), so that the planner sees them leave the device."""
    return {k: host_copy(v.detach(), pin=False) for k, v in module.state_dict().items()}


def offload_checkpoints(denoiser: nn.Module) -> None:
    """cpu_offload_checkpointing: while the denoiser runs forward with gradient enabled, every tensor autograd
    saves for backward goes to host memory and comes back when backward needs it. With gradient checkpointing,
    what is saved is each checkpointed block's inputs (and the few layers outside blocks): those leave the
    device, sd-scripts' cpu_offload_checkpointing. (torch.autograd.graph.save_on_cpu does the same but keeps
    CPU tensors as they are; these hooks always copy, and tell the planner.)"""
    hooks = torch.autograd.graph.saved_tensors_hooks(_to_host_aside, _back_from_host)

    def enter(module, args):  # noqa: ARG001
        if torch.is_grad_enabled():
            hooks.__enter__()
            module._offloading_saved_tensors = True

    def leave(module, args, output):  # noqa: ARG001
        if getattr(module, "_offloading_saved_tensors", False):
            module._offloading_saved_tensors = False
            hooks.__exit__(None, None, None)

    denoiser.register_forward_pre_hook(enter)
    denoiser.register_forward_hook(leave, always_call=True)


_COPY_STREAMS: dict = {}  # device -> the side stream the saved tensors leave on (library/streams.py)


def _to_host_aside(tensor: torch.Tensor) -> tuple:
    """A saved tensor's trip to the host: from an accelerator, copied on a side stream (into pinned memory from
    CUDA) without the host waiting (the compute stream goes on; the device tensor is kept until the copy is done);
    on the CPU a plain copy. Returns (device, host copy, the event recorded after the copy, or None)."""
    device = tensor.device
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = side_stream(device)
    stream = _COPY_STREAMS[device]
    if stream is None:
        return device, host_copy(tensor), None
    stream.wait_stream(current_stream(device))  # the tensor is computed
    with running_on(stream):
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=device.type == "cuda")
        out.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)
        done = recorded(stream)
    tell(out, "host")
    return device, out, done


def _back_from_host(packed: tuple) -> torch.Tensor:
    """The saved tensor back on its device for backward: the compute stream waits for its copy to the host, then
    copies it back, without the host waiting either."""
    device, host, done = packed
    if done is not None:
        current_stream(device).wait_event(done)
    return device_copy(host, device, "activations", non_blocking=done is not None)


def allow_fp16_gradients(accelerator) -> None:
    """full_fp16: trainable weights are fp16, so the grad scaler must unscale fp16 gradients."""
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale


def peak_memory_text() -> str:
    """Peak device memory of this process, per phase of the run (library/phases.py), for the end-of-run summary;
    the process' peak host memory on the CPU."""
    import resource

    from library.phases import report

    per_phase = report()
    if per_phase:
        return per_phase
    return f"peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (CPU)"
