"""pulse_cli.progress: a live rich bar on a terminal, one line per tenth of the work elsewhere."""

from __future__ import annotations

import io
import re

from rich.console import Console

from pulse_cli.progress import ProgressBar


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120, color_system=None), out


def test_off_a_terminal_it_prints_one_plain_line_per_tenth() -> None:
    out = io.StringIO()
    bar = ProgressBar(100, "batch 1/2", stream=out)
    for _ in range(100):
        bar.advance("converged 0/4")
    bar.close()

    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 1 % (the first step), then 10 %, 20 %, ..., 100 %
    assert lines[0].startswith("batch 1/2: 1/100 converged 0/4 (")
    assert lines[-1].startswith("batch 1/2: 100/100 converged 0/4 (")
    assert all(re.search(r"\(\d+ s, eta \d+ s\)$", line) for line in lines)
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_off_a_terminal_a_short_job_prints_each_step() -> None:
    out = io.StringIO()
    with ProgressBar(3, "load", stream=out) as bar:
        bar.update(1)
        bar.update(2)
        bar.update(3)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "load: 1/3",
        "load: 2/3",
        "load: 3/3",
    ]


def test_done_is_capped_at_total() -> None:
    out = io.StringIO()
    bar = ProgressBar(5, "x", stream=out)
    bar.update(9, "too many")
    assert bar.done == 5
    assert out.getvalue().startswith("x: 5/5 too many")


def test_disabled_bar_is_silent() -> None:
    out = io.StringIO()
    console, screen = _terminal()
    for bar in (
        ProgressBar(10, "quiet", stream=out, enabled=False),
        ProgressBar(10, "quiet", enabled=False, console=console),
    ):
        with bar:
            for _ in range(10):
                bar.advance("note")
    assert out.getvalue() == "" and screen.getvalue() == ""


def test_on_a_terminal_rich_draws_the_bar_with_count_and_note() -> None:
    console, screen = _terminal()
    with ProgressBar(10, "batch 2/3", console=console) as bar:
        assert bar.tty
        for _ in range(4):
            bar.advance("converged 1/4")

    text = screen.getvalue()
    assert "batch 2/3" in text
    assert "4/10" in text
    assert "converged 1/4" in text
    assert "━" in text  # rich's bar, not the plain-line fallback
    assert "batch 2/3: " not in text


def test_close_is_idempotent_and_late_updates_print_nothing_on_a_terminal() -> None:
    console, screen = _terminal()
    bar = ProgressBar(2, "once", console=console)
    bar.advance()
    bar.close()
    drawn = screen.getvalue()
    bar.close()
    bar.advance()
    assert screen.getvalue() == drawn


def test_a_stream_without_isatty_counts_as_not_a_terminal() -> None:
    class Sink:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> int:
            self.text += s
            return len(s)

        def flush(self) -> None:
            pass

    sink = Sink()
    bar = ProgressBar(1, "sink", stream=sink)  # type: ignore[arg-type]
    bar.advance()
    assert not bar.tty and sink.text.startswith("sink: 1/1")
