"""Progress of the long data passes (the check, caching): a tqdm bar on a terminal, a few plain lines in a
log file."""
from __future__ import annotations

import sys
import time


class CountingBar:
    def __init__(self, total: int, desc: str, enabled: bool = True, stream=None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stdout
        self.enabled = enabled and total > 0
        self.start = time.perf_counter()
        self.bar = None
        self.next_line = max(1, total // 10) if total >= 200 else total  # small passes: no lines, the caller sums up
        if self.enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=self.stream)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next_line and self.total >= 200:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.desc}: {self.done}/{self.total} ({rate:.1f}/s)", file=self.stream, flush=True)
            self.next_line = self.done + max(1, self.total // 10)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.start
