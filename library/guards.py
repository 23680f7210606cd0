"""What keeps a run from training on garbage or dying without a trace: a guard against NaN/inf losses
and gradients, and a graceful stop on SIGTERM / SIGINT (preemption, Ctrl+C)."""
from __future__ import annotations

import math
import os
import signal

import torch

EXIT_STOPPED = 75  # stopped by a signal after saving a resumable state (EX_TEMPFAIL: "try again")


class NonFiniteLoss(RuntimeError):
    """Raised after `limit` consecutive steps with a NaN/inf loss or gradient."""


class NonFiniteGuard:
    """Skips an optimizer step whose loss or gradients are not finite; stops the run after `limit` such
    steps in a row with a message naming the usual causes."""

    def __init__(self, limit: int, say=print):
        self.limit, self.say = limit, say
        self.in_a_row = 0
        self.skipped = 0
        self._bad_loss = False

    def loss_ok(self, loss: torch.Tensor, processes: int = 1) -> bool:
        """Whether to run backward on `loss`: when it is finite; with several processes, always (each must
        join DDP's gradient all-reduce, or the others wait for it forever; the step is then skipped on every
        process, step_ok deciding together). A non-finite loss is remembered for step_ok."""
        ok = bool(torch.isfinite(loss.detach()).all())
        self._bad_loss |= not ok
        return ok or processes > 1

    def step_ok(self, params, max_grad_norm: float, step: int, accelerator, known_bad: bool = False) -> bool:
        """At an optimizer step: unscale and clip the gradients to max_grad_norm (if > 0), and say whether
        the step may be taken. With fp16 loss scaling, inf gradients are the scaler's business (it skips
        the step and lowers the scale), so only the loss counts. known_bad: the caller already saw
        non-finite gradients (the fused backward pass checks its own)."""
        bad_here = self._bad_loss or known_bad
        if accelerator.num_processes > 1:  # every process must take the same decision
            bad_here = accelerator.reduce(torch.tensor(float(bad_here), device=accelerator.device), "sum").item() > 0
        self._bad_loss = False
        # A skipped step must leave the fp16 GradScaler untouched: unscaled without the update() that
        # optimizer.step() brings, its next unscale_ raises (and before any backward it has no scale yet).
        ok = not bad_here and self._unscale_and_clip(params, max_grad_norm, accelerator)
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

    @staticmethod
    def _unscale_and_clip(params, max_grad_norm: float, accelerator) -> bool:
        """Unscale (fp16) and clip the gradients; whether they are finite (with a GradScaler: its business)."""
        with_grads = [p for p in params if p.grad is not None]
        accelerator.unscale_gradients()
        if max_grad_norm > 0 and with_grads:
            norm = torch.nn.utils.clip_grad_norm_(with_grads, max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads]) if with_grads else torch.tensor(0.0)
        return accelerator.scaler is not None or math.isfinite(float(norm))


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
