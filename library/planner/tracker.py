"""Device-memory bookkeeping for the planner: every tensor storage created on the device, its size,
when it was created and freed, and what it is (weights, gradients, optimizer state, activations, ...).

MemoryTracker is a TorchDispatchMode: it sees the output of every operator, records each new storage
(size in bytes, creation time, the phase it was created in) and frees it through a weakref finalizer
when the storage dies. The same tracker counts fake tensors (the plan of a full-size model) and real
tensors (the check of the plan against real allocations on tiny models).

FakeDevice is the faked accelerator: FakeTensorMode on the CPU device type. torch 2.13's CPU builds can
make fake CUDA tensors but cannot run autograd on them (the fake CUDA device guard is only installed
on CUDA builds without a device), so the fake "device" is the CPU device type, with the CUDA behaviour
that changes memory copied over while a plan runs: CUDA's autocast policy (norms, softmax, losses in
fp32), foreach optimizer and gradient-clipping kernels (CUDA's default), and tensors read on the host
(loss.item(), isfinite checks) answered with 1.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CATEGORIES = ("weights", "adapter weights", "gradients", "optimizer state", "activations", "temporaries")
_SCALAR_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


@dataclass
class Record:
    nbytes: int
    born: int
    phase: str
    died: int | None = None
    category: str | None = None  # set when the storage turns out to be a weight, a gradient, a state
    stream: str = "main"  # "swap": allocated by block swap's copies, on its side stream

    def final_category(self) -> str:
        if self.category:
            return self.category
        return "activations" if self.phase == "forward" else "temporaries"


@dataclass
class Peak:
    """The largest device memory seen in one window of time, and what was alive then."""
    bytes: int = 0
    clock: int = -1
    phase: str = ""

    def breakdown(self, records: list[Record]) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for r in records:
            if r.born <= self.clock and (r.died is None or r.died > self.clock):
                key = r.final_category()
                out[key] = out.get(key, 0) + r.nbytes
        return out


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of every storage alive on the device, over time."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No torch._dynamo.disable wrapper around __torch_dispatch__ (TorchDispatchMode's documented opt-out): a
        plan never compiles, and the wrapper's two calls per operator were ~10% of a FLUX.1 plan's time."""
        return False

    def __init__(self, fake_scalars: bool = False):
        super().__init__()
        self.records: list[Record] = []
        self.by_storage: dict[int, Record] = {}  # id(storage) -> record, while the storage lives
        self.clock = 0
        self.current = 0
        self.phase = "setup"
        self.peak = Peak()  # over the whole run
        self.windows: dict[str, Peak] = {}
        self.spans: dict[str, tuple[int, int]] = {}  # window name -> (first clock, last clock)
        self.releases: list[int] = []  # clocks at which the run called torch.cuda.empty_cache
        self._open: list[str] = []
        self.fake_scalars = fake_scalars
        # host memory: storages made while code runs on the host (host_by_default) or moved there (release)
        self.host: dict[int, int] = {}  # id(storage) -> bytes
        self.host_current = 0
        self.host_peaks: dict[str, int] = {}  # window name -> the most host memory it added
        self._host_start: dict[str, int] = {}
        self._on_host = False

    # ---- what the run says -----------------------------------------------------------------
    @contextlib.contextmanager
    def window(self, name: str):
        """Measure the peak of a stretch of the run separately (e.g. the VAE encoding phase)."""
        self.windows[name] = Peak(self.current, self.clock, self.phase)
        self._host_start[name] = self.host_current
        self.host_peaks[name] = 0
        self._open.append(name)
        start = self.clock
        try:
            yield self.windows[name]
        finally:
            self._open.remove(name)
            self.spans[name] = (start, self.clock)

    @contextlib.contextmanager
    def host_by_default(self):
        """Code that names no device (loading, casting, building a file's tensors): a new storage is host memory
        unless one of the operator's inputs is on the device, as PyTorch places it (factories on the CPU,
        results where their inputs are)."""
        self._on_host = True
        try:
            yield
        finally:
            self._on_host = False

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def tag(self, tensors, category: str) -> None:
        """The storages of `tensors` are (from now on, and at every peak they were alive at) `category`."""
        for t in tensors:
            if t is None:
                continue
            record = self.by_storage.get(id(t.untyped_storage()))
            if record is not None:
                record.category = category

    def arrive(self, tensors, category: str, stream: str = "main") -> None:
        """The storages of `tensors` come (back) to the device now (a module moved over after the caches),
        copied on `stream`."""
        for t in tensors:
            self._leave_host(t.untyped_storage())
            record = self._track(t)
            if record is not None:
                record.stream = stream
        self.tag(tensors, category)

    def release(self, tensors) -> None:
        """The storages of `tensors` leave the device (moved to the CPU: offloaded modules)."""
        for t in tensors:
            key = id(t.untyped_storage())
            record = self.by_storage.pop(key, None)
            if record is not None and record.died is None:
                self._free(record)
            if t.device.type != "meta":
                self._on_host_now(t.untyped_storage())

    def empty_cache(self) -> None:
        """The run gives the allocator's cached blocks back now (torch.cuda.empty_cache; the allocator model
        replays it)."""
        self.clock += 1
        self.releases.append(self.clock)

    # ---- bookkeeping -----------------------------------------------------------------------
    def _free(self, record: Record) -> None:
        self.clock += 1
        record.died = self.clock
        self.current -= record.nbytes

    def _on_death(self, key: int, record: Record) -> None:
        if record.died is None:
            self._free(record)
        if self.by_storage.get(key) is record:
            del self.by_storage[key]

    def _track(self, t: torch.Tensor) -> Record | None:
        if t.device.type in ("meta",) or t.layout != torch.strided:
            return None
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.by_storage or key in self.host:  # a host buffer written in place stays on the host
            return None
        self.clock += 1
        record = Record(storage.nbytes(), self.clock, self.phase)
        self.records.append(record)
        self.by_storage[key] = record
        weakref.finalize(storage, self._on_death, key, record)
        self.current += record.nbytes
        if self.current > self.peak.bytes:
            self.peak = Peak(self.current, self.clock, self.phase)
        for name in self._open:
            w = self.windows[name]
            if self.current > w.bytes:
                w.bytes, w.clock, w.phase = self.current, self.clock, self.phase
        return record

    # ---- host memory --------------------------------------------------------------------------
    def _on_host_now(self, storage) -> None:
        key = id(storage)
        if key in self.host or key in self.by_storage:
            return
        self.host[key] = storage.nbytes()
        self.host_current += storage.nbytes()
        for name in self._open:
            self.host_peaks[name] = max(self.host_peaks[name], self.host_current - self._host_start[name])
        weakref.finalize(storage, self._host_death, key, storage.nbytes())

    def _leave_host(self, storage) -> None:
        nbytes = self.host.pop(id(storage), None)
        if nbytes is not None:
            self.host_current -= nbytes

    def _host_death(self, key: int, nbytes: int) -> None:
        if self.host.get(key) == nbytes:
            del self.host[key]
            self.host_current -= nbytes

    def _from_device(self, args, kwargs) -> bool:
        """Whether an operator's inputs (tensors, or lists of them) include a storage on the device."""
        for a in (*args, *kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor) and id(t.untyped_storage()) in self.by_storage:
                    return True
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake_scalars and func in _SCALAR_OPS:
            return _fake_scalar(args[0])
        if self.fake_scalars and func is torch.ops.aten.equal.default:
            return False
        out = func(*args, **kwargs)
        on_host = self._on_host and (_names_the_host(func, kwargs) or not self._from_device(args, kwargs))
        for t in _tensors(out):
            if on_host:
                if t.layout == torch.strided and t.device.type != "meta":
                    self._on_host_now(t.untyped_storage())
            else:
                self._track(t)
        return out

    def breakdown(self, peak: Peak | None = None) -> dict[str, int]:
        return (peak or self.peak).breakdown(self.records)


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                yield o


def _names_the_host(func, kwargs) -> bool:
    """tensor.to("cpu", dtype) and the like: an operator told to put its result on the CPU (in host_by_default,
    where the device the run computes on is never named "cpu")."""
    device = kwargs.get("device")
    return func is torch.ops.aten._to_copy.default and device is not None and torch.device(device).type == "cpu"


def _fake_scalar(t: torch.Tensor):
    """A value read from the device during a plan (loss.item(), bool(isfinite(...).all())): 1."""
    if t.dtype == torch.bool:
        return True
    return 1.0 if t.is_floating_point() else 1


# ---------------------------------------------------------------------------------------------
# The faked device
# ---------------------------------------------------------------------------------------------

# ops CUDA's autocast runs in fp32 that CPU autocast leaves in the input dtype: activations after them are
# fp32 on the GPU (GroupNorm -> SiLU in every ResNet block), so a plan must do the same
CUDA_FP32_OPS = ("group_norm", "layer_norm", "softmax.int", "log_softmax.int", "mse_loss", "exp", "pow.Tensor_Scalar",
                 "rsqrt", "sum", "cumsum", "norm.Scalar", "softplus", "logsumexp")


@dataclass
class FakeDevice:
    """Enter to run code on fake tensors on the faked accelerator; `device` is what the step moves to."""
    fake: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "FakeDevice":
        stack = contextlib.ExitStack()
        stack.enter_context(_cuda_like_optimizers())
        stack.enter_context(_cuda_autocast_policy())
        if self.fake:
            from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

            mode = _planner_fake_mode()(allow_non_fake_inputs=True)
            # module.to() swaps fake parameters in place, which fails while the converter's memo holds a
            # weak reference to them; outputs of ops need no memo
            mode.fake_tensor_converter.from_meta_and_device = (
                lambda fake_mode, t, device, pytype=None, dispatch_keys=None:
                FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys))
            stack.enter_context(mode)
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        self._stack.__exit__(*exc)


def _planner_fake_mode() -> type:
    """FakeTensorMode without the torch._dynamo.disable wrapper around its __torch_dispatch__ (as MemoryTracker):
    the same method (torch's call counter included), a plan never compiles."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class PlannerFakeMode(FakeTensorMode):
        __torch_dispatch__ = getattr(FakeTensorMode.__torch_dispatch__, "__wrapped__",
                                     FakeTensorMode.__torch_dispatch__)

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False

    return PlannerFakeMode


@contextlib.contextmanager
def _cuda_like_optimizers():
    """torch's optimizers and clip_grad_norm_ use their foreach kernels on CUDA (more peak memory than
    the per-tensor loop they use on the CPU): make them do so here."""
    import torch.optim.optimizer as optimizer_module
    import torch.utils._foreach_utils as foreach_utils
    import torch.nn.utils.clip_grad as clip_module

    from torch._subclasses.fake_tensor import FakeTensor

    saved, lists = [], []
    for module in (optimizer_module, foreach_utils):
        supported = getattr(module, "_foreach_supported_types", None)
        if isinstance(supported, list) and FakeTensor not in supported:
            supported.append(FakeTensor)
            lists.append(supported)
    for module in (optimizer_module, foreach_utils, clip_module):
        if hasattr(module, "_get_foreach_kernels_supported_devices"):
            original = module._get_foreach_kernels_supported_devices
            saved.append((module, original))
            module._get_foreach_kernels_supported_devices = lambda original=original: [*original(), "cpu"]
    try:
        yield
    finally:
        for module, original in saved:
            module._get_foreach_kernels_supported_devices = original
        for supported in lists:
            supported.remove(FakeTensor)


@contextlib.contextmanager
def _cuda_autocast_policy():
    """CPU autocast made to cast CUDA's fp32-list ops to fp32 (python kernels on the AutocastCPU key,
    removed when the plan ends)."""
    import warnings

    lib = torch.library.Library("aten", "IMPL")
    keyset = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def kernel_for(op):
        def kernel(*args, **kwargs):
            # runs only while CPU autocast is on (this key is active then)
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                             for a in args)
                return op(*args, **kwargs)
        return kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in CUDA_FP32_OPS:
            base, _, overload = name.partition(".")
            packet = getattr(torch.ops.aten, base)
            op = getattr(packet, overload or "default")
            lib.impl(name, kernel_for(op), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()
