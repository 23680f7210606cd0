"""Optimizers and learning-rate schedules by the names sd-scripts users type, and the fused backward pass."""
from __future__ import annotations

import importlib

import torch

from library.config import ConfigError, optimizer_kwargs


def build_optimizer(name: str, param_groups: list[dict], lr: float, args: list[str]) -> torch.optim.Optimizer:
    """`name` is case-insensitive, or a dotted class path (`torch.optim.RAdam`, `mypkg.MyOpt`).

    Adafactor runs with the given learning rate and our schedule unless optimizer_args ask for relative_step
    (or warmup_init, which sd-scripts reads as relative_step too): then, as in sd-scripts, Adafactor picks its
    own step size, every group's rate is dropped and build_scheduler returns RelativeStepSchedule."""
    kwargs = optimizer_kwargs(args)
    cls = optimizer_class(name)
    if name.lower() == "sgdnesterov":
        kwargs = {"momentum": 0.9, "nesterov": True, **kwargs}
    if name.lower() == "adafactor":
        kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **kwargs}
        if kwargs["warmup_init"] and not kwargs["relative_step"]:
            kwargs["relative_step"] = True  # sd-scripts: warmup_init needs relative_step, so it sets it
        if kwargs["relative_step"]:
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in param_groups]
            return cls(groups, lr=None, **kwargs)
    return cls(param_groups, lr=lr, **kwargs)


def relative_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer is an Adafactor that picks its own step size (relative_step)."""
    return any(bool(g.get("relative_step")) for g in optimizer.param_groups)


class RelativeStepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The schedule of a relative-step Adafactor (transformers' AdafactorSchedule, as sd-scripts uses it): it
    changes nothing, Adafactor computes each step's size; get_last_lr() reports that size (the first group's,
    min(1e-2, 1/sqrt(step)), times the weights' RMS with scale_parameter), `initial_lr` before the first step.
    Works on a FusedBackward of Adafactors too."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float):
        self.initial_lr = initial_lr
        for group in optimizer.param_groups:
            group["initial_lr"] = initial_lr
        super().__init__(optimizer, lambda _: 1.0)

    def get_lr(self) -> list[float]:
        from transformers.optimization import Adafactor

        lrs = []
        for group in self.optimizer.param_groups:
            state = self._state(group["params"][0])
            lrs.append(float(Adafactor._get_lr(group, state)) if state.get("step") else self.initial_lr)
        return lrs

    def _state(self, param) -> dict:
        if isinstance(self.optimizer, FusedBackward):
            return self.optimizer.state_of(param)
        return self.optimizer.state.get(param, {})


def optimizer_args_problem(name: str, lr: float, args: list[str]) -> str | None:
    """Why this optimizer cannot be built with these optimizer_args (an unknown argument, a value of the wrong
    type), found by building it on one tiny tensor before any model loads; None if it builds."""
    probe = torch.zeros(1, requires_grad=True)
    try:
        build_optimizer(name, [{"params": [probe]}], lr, args)
    except ConfigError as e:
        return str(e)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # the optimizer's own argument checks
        return f"{name} does not accept optimizer_args {args}: {e}"
    return None


def optimizer_class(name: str) -> type:
    key = name.lower()
    if key in ("adamw", "sgdnesterov"):
        return torch.optim.AdamW if key == "adamw" else torch.optim.SGD
    if key in ("adamw8bit", "pagedadamw8bit", "lion", "lion8bit", "pagedlion8bit"):
        import bitsandbytes as bnb

        names = {"adamw8bit": "AdamW8bit", "pagedadamw8bit": "PagedAdamW8bit", "lion": "Lion",
                 "lion8bit": "Lion8bit", "pagedlion8bit": "PagedLion8bit"}
        return getattr(bnb.optim, names[key])
    if key == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if key == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer_type Prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return Prodigy
    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"optimizer_type {name!r}: no such optimizer or importable class") from None


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int | float, total_steps: int,
                    num_cycles: int = 1, power: float = 1.0, scheduler_type: str | None = None,
                    scheduler_args: list[str] = (), initial_lr: float = 0.0, min_lr_ratio: float | None = None,
                    decay: int | float = 0, timescale: int | None = None):
    """A relative-step Adafactor gets RelativeStepSchedule (initial_lr: what it reports before the first step;
    sd-scripts ignores lr_scheduler then too). Otherwise diffusers' and transformers' schedules with sd-scripts'
    arguments; `warmup` and `decay` below 1 are fractions of the total steps. `scheduler_args` (Python literals)
    go to the schedule function, as sd-scripts passes lr_scheduler_args; `scheduler_type` names a scheduler
    class (torch.optim.lr_scheduler's, or a dotted path) made with (optimizer, **args) instead."""
    kwargs = optimizer_kwargs(list(scheduler_args), "lr_scheduler_args")
    if relative_step(optimizer):
        return RelativeStepSchedule(optimizer, initial_lr)
    if scheduler_type:
        return _scheduler_class(scheduler_type)(optimizer, **kwargs)
    warmup_steps = steps_of(warmup, total_steps)
    if name == "constant" and warmup_steps:
        name = "constant_with_warmup"
    function, arguments = _schedule(name, warmup_steps, total_steps, num_cycles, power, min_lr_ratio,
                                    steps_of(decay, total_steps), timescale)
    return function(optimizer, **{**arguments, **kwargs})


def schedule_of(o, optimizer: torch.optim.Optimizer, total_steps: int):
    """build_scheduler with the [optimizer] section's settings."""
    return build_scheduler(o.lr_scheduler, optimizer, o.lr_warmup_steps, total_steps, o.lr_scheduler_num_cycles,
                           o.lr_scheduler_power, o.lr_scheduler_type, o.lr_scheduler_args,
                           min_lr_ratio=o.lr_scheduler_min_lr_ratio, decay=o.lr_decay_steps,
                           timescale=o.lr_scheduler_timescale)


def steps_of(value: int | float, total_steps: int) -> int:
    """A step count, or a fraction below 1 of the total (sd-scripts' lr_warmup_steps / lr_decay_steps)."""
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def _schedule(name, warmup, total, num_cycles, power, min_lr_ratio, decay, timescale) -> tuple:
    """The schedule function of `name` and the arguments sd-scripts' get_scheduler_fix gives it: cosine_with_min_lr
    and warmup_stable_decay take half of lr_scheduler_num_cycles (1: a half cosine down), WSD is stable for the
    steps that warmup and decay leave; an argument the schedule does not read is ignored, as there."""
    from diffusers import optimization as d
    from transformers import optimization as tf

    w = {"num_warmup_steps": warmup}
    wt = {**w, "num_training_steps": total}
    table = {"constant": (d.get_constant_schedule, {}),
             "constant_with_warmup": (d.get_constant_schedule_with_warmup, w),
             "linear": (d.get_linear_schedule_with_warmup, wt),
             "cosine": (d.get_cosine_schedule_with_warmup, wt),
             "cosine_with_restarts": (d.get_cosine_with_hard_restarts_schedule_with_warmup,
                                      {**wt, "num_cycles": num_cycles}),
             "polynomial": (d.get_polynomial_decay_schedule_with_warmup, {**wt, "power": power}),
             "cosine_with_min_lr": (tf.get_cosine_with_min_lr_schedule_with_warmup,
                                    {**wt, "num_cycles": num_cycles / 2, "min_lr_rate": min_lr_ratio}),
             "warmup_stable_decay": (tf.get_wsd_schedule,
                                     {**w, "num_stable_steps": total - warmup - decay, "num_decay_steps": decay,
                                      "num_cycles": num_cycles / 2, "min_lr_ratio": min_lr_ratio or 0.0}),
             "inverse_sqrt": (tf.get_inverse_sqrt_schedule, {**w, "timescale": timescale}),
             "piecewise_constant": (d.get_piecewise_constant_schedule, {})}
    return table[name]


def _scheduler_class(path: str) -> type:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module or "torch.optim.lr_scheduler"), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"lr_scheduler_type {path!r}: no such scheduler class") from None


class FusedBackward(torch.optim.Optimizer):
    """Optimizer steps inside backward: the parameters are split into chunks (one per parameter for
    fused_backward_pass, N for fused_optimizer_groups), each with an optimizer of its own. When the last
    gradient of a chunk is accumulated, a hook clips that chunk (max_grad_norm applies per chunk, not
    over all gradients), steps it and frees its gradients, so the full set of gradients never exists.

    To the LR scheduler this looks like one optimizer whose param_groups are the chunks' groups (the
    same dicts), so a schedule sets every chunk's learning rate; step() and zero_grad() do nothing,
    backward did the work."""

    def __init__(self, name: str, param_groups: list[dict], lr: float, args: list[str],
                 chunks: int | None = None, max_grad_norm: float = 0.0, build=None, state_on_host: bool = False):
        self.optimizers: list[torch.optim.Optimizer] = []
        self.max_grad_norm = max_grad_norm
        self.chunk_params: list[list[torch.nn.Parameter]] = []
        for group in param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            for piece in _split(params, chunks):
                settings = {k: v for k, v in group.items() if k != "params"}
                self.optimizers.append((build or build_optimizer)(name, [{"params": piece, **settings}], lr, args))
                self.chunk_params.append(piece)
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.defaults, self.state = {}, {}
        self._ready = [0] * len(self.chunk_params)
        self._handles = []
        for index, piece in enumerate(self.chunk_params):
            for param in piece:
                self._handles.append(param.register_post_accumulate_grad_hook(self._hook(index)))
        self.gradient_watchers = []  # callables(params) called just before a chunk's gradients are freed
        self.nonfinite = 0  # chunks not stepped since the last pop_nonfinite(): NaN/inf in their gradients
        self.host_state = HostState(self.optimizers) if state_on_host else None  # offload_optimizer_state

    def _hook(self, index: int):
        def on_gradient(_param: torch.Tensor) -> None:
            self._ready[index] += 1
            if self._ready[index] == len(self.chunk_params[index]):
                self._step_chunk(index)
        return on_gradient

    def _step_chunk(self, index: int) -> None:
        self._ready[index] = 0
        piece = self.chunk_params[index]
        for watch in self.gradient_watchers:
            watch(piece)
        grads = [p.grad for p in piece if p.grad is not None]
        if grads:  # checked on the device, never read here (a read per chunk would be a sync per parameter)
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            self.nonfinite = self.nonfinite + (~finite).int()
            for grad in grads:  # not finite: this chunk steps with a zero gradient (see pop_nonfinite)
                grad.masked_fill_(~finite, 0.0)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in piece if p.grad is not None], self.max_grad_norm)
        optimizer = self.optimizers[index]
        if self.host_state is not None:
            self.host_state.bring(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.host_state is not None:
            self.host_state.send_back(optimizer)

    def step(self, closure=None):  # noqa: ARG002
        """After backward: step the chunks some of whose parameters got no gradient this time (layers the
        forward pass did not use, such as the last text-encoder layer under clip_skip)."""
        for index, ready in enumerate(self._ready):
            if ready:
                self._step_chunk(index)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002
        return None

    def state_of(self, param: torch.nn.Parameter) -> dict:
        """The optimizer state of one parameter (block swap moves it with its weight)."""
        if not hasattr(self, "_owner"):
            self._owner = {id(p): opt for opt, piece in zip(self.optimizers, self.chunk_params) for p in piece}
        return self._owner[id(param)].state[param]

    def pop_nonfinite(self) -> torch.Tensor | bool:
        """Whether any chunk had NaN/inf gradients since the last call: a flag on the device, which the NaN
        guard reads with the rest of the step's checks (one read per step). Such a chunk was stepped with a
        zero gradient, since deciding to skip it would have read the device once per chunk: its weights
        still move by the optimizer's momentum and weight decay for that step. A NaN/inf loss (the usual
        origin of non-finite gradients) is caught before backward and skips the whole step."""
        bad, self.nonfinite = self.nonfinite, 0
        return bad > 0 if isinstance(bad, torch.Tensor) else False

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()


class HostState:
    """optimizer.offload_optimizer_state: the fused backward pass's optimizer state kept in host memory (pinned
    on CUDA) between steps. When a chunk's gradients are complete its state comes to the device, the chunk
    steps, and the updated state goes back into its host buffers, so the device holds one chunk's state at a
    time instead of all of it (SD1.5's U-Net under Adafactor: 1.70 GiB), for 2 x the state over PCIe a step.

    The copies back run on a side stream after the step's kernels, without the host waiting (backward goes on
    meanwhile), as block swap's write-back does (library/block_swap.py); an event recorded after each chunk's
    copies is what the chunk's next copy in waits for on the device, and what a reader on the host waits for
    (state_dict, for a saved state: settle). A state loaded on resume (torch puts it on the device) goes back
    to the host at once. Block swap's weights bring their state with their block and take it back with it
    (library/block_swap.py, on its own stream): `elsewhere(param)` names them, and they are left to it."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        from library.memory import HostSlabs

        self.slabs = HostSlabs(pin=True)  # pinned only where CUDA is present
        self.buffers: dict[tuple[int, str], torch.Tensor] = {}  # (id(param), key) -> host buffer
        self.writing: dict[int, object] = {}  # id(optimizer) -> the event after its copies back (not on the CPU)
        self.stream = None  # the side stream of the copies back, made on first use
        self.elsewhere = lambda param: False  # parameters whose state another mover keeps (block swap)
        for optimizer in optimizers:
            optimizer.register_state_dict_pre_hook(lambda _optimizer: self.settle())
            optimizer.register_load_state_dict_post_hook(self.send_back)

    def bring(self, optimizer: torch.optim.Optimizer) -> None:
        """The state of `optimizer`'s parameters from their host buffers to the parameters' device."""
        from library.memory import device_copy
        from library.streams import current_stream

        written = self.writing.pop(id(optimizer), None)
        for p, state in optimizer.state.items():
            if self.elsewhere(p):
                continue
            if written is not None:  # the device's wait: the last copies back into these buffers come first
                current_stream(p.device).wait_event(written)
                written = None
            for key, value in state.items():
                if value is self.buffers.get((id(p), key)):
                    state[key] = device_copy(value, p.device, "optimizer state", non_blocking=value.is_pinned())

    def send_back(self, optimizer: torch.optim.Optimizer) -> None:
        """The state of `optimizer`'s parameters copied into their host buffers (made on first use)."""
        from library.memory import tell
        from library.streams import current_stream, recorded, running_on, side_stream

        moved = [(p, key, value) for p, state in optimizer.state.items() if not self.elsewhere(p)
                 for key, value in state.items()
                 if isinstance(value, torch.Tensor) and value.dim() > 0 and value is not self.buffers.get((id(p), key))]
        if not moved:
            return
        device = moved[0][2].device
        stream = None
        if device.type != "cpu":
            stream = self.stream = self.stream or side_stream(device)
            stream.wait_stream(current_stream(device))  # after the step's kernels
        with running_on(stream):
            for p, key, value in moved:
                buffer = self.buffers.get((id(p), key))
                if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                    buffer = self.buffers[(id(p), key)] = self.slabs.take(value.shape, value.dtype)
                buffer.copy_(value, non_blocking=stream is not None)
                if stream is not None:
                    value.record_stream(stream)  # its device memory is not reused before the copy is done
                tell(buffer, "host")
                optimizer.state[p][key] = buffer
        if stream is not None:
            self.writing[id(optimizer)] = recorded(stream)

    def settle(self) -> None:
        """Wait (the host) for the copies back in flight: afterwards the host buffers are current."""
        for event in self.writing.values():
            event.synchronize()
        self.writing.clear()

    def host_bytes(self) -> int:
        return self.slabs.host_bytes()


def _split(params: list, chunks: int | None) -> list[list]:
    """One chunk per parameter (None), or `chunks` contiguous chunks of about equal element count."""
    if chunks is None:
        return [[p] for p in params]
    total = sum(p.numel() for p in params)
    out, current, size = [], [], 0
    for param in params:
        current.append(param)
        size += param.numel()
        if size >= total * (len(out) + 1) / chunks and len(out) < chunks - 1:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out
