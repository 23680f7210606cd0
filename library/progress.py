"""Training progress that reads well on a terminal (a tqdm bar) and in a log file (plain lines)."""
from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, every: int = 0, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.bar = None
        self.every = every or max(1, total // 20)
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="steps", dynamic_ncols=True, file=self.stream)

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif step % self.every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.start
            rate = step / elapsed if elapsed > 0 else 0.0
            left = (self.total - step) / rate if rate > 0 else 0.0
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s  "
                  f"elapsed {_duration(elapsed)}  left {_duration(left)}", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start


class StepLog:
    """The values of each optimizer step (its loss, and whatever else the recipe logs), kept on the device and
    read by the host at the logging cadence, all the steps since the last read in one copy: a read is a sync
    (the host waits for the device to finish everything queued), so the step itself has none. Then each step
    goes to the progress line and to the trackers, and to `series(name)`, the lists the recipes return."""

    def __init__(self, progress: Progress, accelerator):
        self.progress, self.accelerator = progress, accelerator
        self.micro: list = []  # this step's micro-batch losses (device tensors)
        self.pending: list[tuple[int, float, list, dict]] = []  # (step, lr, micro losses, {name: device scalar})
        self.read: dict[str, list[float]] = {"loss": []}

    def series(self, name: str) -> list[float]:
        """The values of `name` read so far, one per step (the same list, filled at each read)."""
        return self.read.setdefault(name, [])

    def add(self, loss) -> None:
        """A micro-batch's loss (gradient accumulation: the step's loss is their mean)."""
        self.micro.append(loss.detach())

    def step(self, step: int, lr: float, **values) -> None:
        """Step `step` is done; `values`: more device scalars to log with it. Read now at the cadence."""
        self.pending.append((step, lr, self.micro, values))
        self.micro = []
        if step % self.progress.every == 0 or step == self.progress.total:
            self.flush()

    def flush(self) -> None:
        """Read every pending step's values (one copy to the host) and log them."""
        import torch

        if not self.pending:
            return
        device = self.pending[0][2][0].device
        flat = torch.stack([torch.as_tensor(v).to(device, torch.float64) for _, _, micro, values in self.pending
                            for v in [*micro, *values.values()]]).cpu().tolist()
        read = iter(flat)
        for step, lr, micro, more in self.pending:
            losses = [next(read) for _ in micro]
            values = {"loss": sum(losses) / len(losses), **{name: next(read) for name in more}}
            for name, value in values.items():
                self.series(name).append(value)
            self.progress.update(step, values["loss"], lr)
            self.accelerator.log({**values, "lr": lr}, step=step)
        self.pending = []
