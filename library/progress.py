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
