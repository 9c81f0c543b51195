"""A dependency-free progress bar for long searches (stderr; one line per update off a TTY)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """`[####....] 40/100 label` redrawn in place on a terminal; sparse log lines otherwise."""

    def __init__(
        self, total: int, label: str = "", *, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.started = time.perf_counter()
        self._last_logged = -1

    def update(self, done: int, note: str = "") -> None:
        self.done = min(done, self.total)
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.started
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        if self.tty:
            bar = "#" * int(frac * 30)
            line = f"\r[{bar:<30}] {self.done}/{self.total} {self.label} {note} eta {eta:4.0f}s"
            self.stream.write(line[:160].ljust(100))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_logged:
                self._last_logged = decile
                self.stream.write(f"{self.label}: {self.done}/{self.total} {note}\n")
                self.stream.flush()

    def advance(self, note: str = "") -> None:
        self.update(self.done + 1, note)

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
