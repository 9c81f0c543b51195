"""The progress bar of long searches: rich's live bar on a terminal, sparse log lines elsewhere.

On a terminal, `rich.progress` (installed with Prefect) draws the bar with the count, elapsed
time, ETA and a note (e.g. how many samples converged), redrawn in place. Anywhere else (a log
file, a CI job, a pipe) redrawing would write hundreds of lines or control codes, so the bar
prints one plain line per tenth of the work instead: readable with `less` or `grep`.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

LOG_STEPS = 10  # off a terminal: one line each time another tenth of the work is done


class ProgressBar:
    """Progress of `total` steps, shown on `stream` (stderr by default).

    `enabled=False` shows nothing (`--json`, `--quiet`). `console`, a rich Console, replaces
    `stream` and decides terminal or not itself (tests, or sharing one console with other
    output). Use `with ProgressBar(...) as bar:` or call `close()`: on a terminal it ends the
    live display and leaves the finished bar on screen.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        console: Console | None = None,
    ) -> None:
        self.total = max(total, 1)  # steps; 0 would divide by zero and mean "nothing to show"
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = console.is_terminal if console is not None else _isatty(self.stream)
        self.done = 0
        self.started = time.perf_counter()
        self._last_logged = -1  # the last tenth printed off a terminal
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled and self.tty:
            self._start_live(console)

    def _start_live(self, console: Console | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console or Console(file=self.stream),
        )
        self._task = self._progress.add_task(self.label, total=self.total, note="")
        self._progress.start()

    def update(self, done: int, note: str = "") -> None:
        """Set the number of steps done (capped at `total`) and the note shown beside it."""
        self.done = min(done, self.total)
        if not self.enabled:
            return
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=self.done, note=note)
            return
        if self.tty:
            return  # closed: a late update must not print log lines onto a terminal
        tenth = self.done * LOG_STEPS // self.total
        if tenth != self._last_logged:
            self._last_logged = tenth
            self.stream.write(f"{self._log_line(note)}\n")
            self.stream.flush()

    def _log_line(self, note: str) -> str:
        elapsed = time.perf_counter() - self.started
        eta = elapsed * (self.total - self.done) / self.done if self.done else 0.0
        words = [f"{self.label}:" if self.label else "", f"{self.done}/{self.total}", note]
        timing = f"({elapsed:.0f} s, eta {eta:.0f} s)"
        return " ".join(w for w in (*words, timing) if w)

    def advance(self, note: str = "") -> None:
        """One more step done."""
        self.update(self.done + 1, note)

    def close(self) -> None:
        """End the live display (idempotent); the finished bar stays on the terminal."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
