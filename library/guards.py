"""What keeps a run from training on garbage or dying without a trace: a guard against NaN/inf losses
and gradients, and a graceful stop on SIGTERM / SIGINT (preemption, Ctrl+C)."""
from __future__ import annotations

import os
import signal

import torch

EXIT_STOPPED = 75  # stopped by a signal after saving a resumable state (EX_TEMPFAIL: "try again")


class NonFiniteLoss(RuntimeError):
    """Raised after `limit` consecutive steps with a NaN/inf loss or gradient."""


class NonFiniteGuard:
    """Skips an optimizer step whose loss or gradients are not finite; stops the run after `limit` such
    steps in a row with a message naming the usual causes.

    The host reads one value from the device per optimizer step (a sync): whether the step's losses and
    gradient norm were finite, read once they are all known. `before_backward` (the fused backward pass,
    which steps inside backward): each loss is read before its backward instead."""

    def __init__(self, limit: int, say=print, before_backward: bool = False):
        self.limit, self.say, self.before_backward = limit, say, before_backward
        self.in_a_row = 0
        self.skipped = 0
        self._bad_loss = False  # a loss read as not finite (before_backward, or with a GradScaler)
        self._losses_finite: torch.Tensor | None = None  # on the device: this step's losses, not read yet

    def loss_ok(self, loss: torch.Tensor, processes: int = 1) -> bool:
        """Whether to run this loss' backward: always, unless read before backward (a non-finite loss gives
        non-finite gradients, and the step is skipped). With several processes, always: each must join DDP's
        gradient all-reduce, or the others wait for it forever (non-finite gradients reach every process through
        it, and the step is skipped on all of them)."""
        finite = torch.isfinite(loss.detach()).all()
        if self.before_backward:
            self._bad_loss |= not bool(finite)
            return not self._bad_loss or processes > 1
        self._losses_finite = finite if self._losses_finite is None else self._losses_finite & finite
        return True

    def step_ok(self, params, max_grad_norm: float, step: int, accelerator, known_bad: bool = False) -> bool:
        """At an optimizer step: unscale and clip the gradients to max_grad_norm (if > 0), and say whether
        the step may be taken. With fp16 loss scaling, inf gradients are the scaler's business (it skips
        the step and lowers the scale), so only the loss counts. known_bad: the caller already saw
        non-finite gradients (the fused backward pass checks its own)."""
        if accelerator.scaler is not None and self._losses_finite is not None:
            # A skipped step must leave the fp16 GradScaler untouched: unscaled without the update() that
            # optimizer.step() brings, its next unscale_ raises (and before any backward it has no scale yet).
            # So the losses are read before unscaling (the scaler reads its own inf check in step() anyway).
            self._bad_loss |= not bool(self._losses_finite)
            self._losses_finite = None
        finite = self._unscale_and_clip(params, max_grad_norm, accelerator) if not self._bad_loss else None
        ok = self._decide(finite, known_bad, accelerator)
        if ok:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        self.say(f"step {step + 1}: loss or gradients are NaN/inf; step skipped ({self.in_a_row} in a row)")
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(
                f"{self.in_a_row} steps in a row had NaN/inf losses or gradients; stopping instead of training "
                f"on garbage. Usual causes: the VAE in fp16 (SDXL's VAE overflows: keep it in fp32 with "
                f"no_half_vae), a learning rate too high for this optimizer, fp16 without loss scaling "
                f"(full_fp16): try bf16, a lower learning_rate, or max_grad_norm = 1.0")
        return False

    def _decide(self, finite: torch.Tensor | None, known_bad, accelerator) -> bool:
        """The step's one read: its losses, gradient norm and `known_bad` (a device flag, or a bool) all fine;
        with several processes, on every process (they must decide alike)."""
        flags = [] if finite is None else [finite]
        if self._losses_finite is not None:
            flags.append(self._losses_finite)
        if isinstance(known_bad, torch.Tensor):
            flags.append(~known_bad)
        bad = self._bad_loss or (known_bad is True)
        self._bad_loss, self._losses_finite = False, None
        if accelerator.num_processes == 1 and (bad or not flags):
            return not bad  # known on the host already: no read
        device = accelerator.device
        ok = torch.stack([f.to(device) for f in flags]).all() if flags and not bad else torch.tensor(not bad,
                                                                                                    device=device)
        if accelerator.num_processes > 1:
            ok = accelerator.reduce(ok.float(), "sum") == accelerator.num_processes
        return bool(ok)

    @staticmethod
    def _unscale_and_clip(params, max_grad_norm: float, accelerator) -> torch.Tensor | None:
        """Unscale (fp16) and clip the gradients, without a sync; whether they are finite, as a device flag (None
        with a GradScaler: its business)."""
        with_grads = [p for p in params if p.grad is not None]
        accelerator.unscale_gradients()
        if max_grad_norm > 0 and with_grads:
            norm = torch.nn.utils.clip_grad_norm_(with_grads, max_grad_norm)
        elif accelerator.scaler is None and with_grads:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads])
        else:
            return None
        if hasattr(norm, "full_tensor"):  # FSDP2's shards: the norm is a DTensor, the same on every process
            norm = norm.full_tensor()
        return None if accelerator.scaler is not None else torch.isfinite(norm)


class StopSignal:
    """First SIGTERM/SIGINT: `requested` becomes true; the loop finishes its step, saves a resumable state
    and exits with EXIT_STOPPED. A second signal exits at once (saves are atomic, so nothing is corrupt)."""

    def __init__(self, say=print):
        self.requested = False
        self.say = say
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook runners): no handler
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            self.say(f"second {signal.Signals(signum).name}: exiting now")
            os._exit(128 + signum)
        self.requested = True
        self.say(f"{signal.Signals(signum).name}: finishing this step, then saving a resumable state "
                 f"(send it again to exit at once)")
