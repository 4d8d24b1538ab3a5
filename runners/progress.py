"""Progress for long work: elapsed time and an estimate of what is left, one helper for every runner.

`Progress(total, label=...)` counts units of work (optimizer steps, ledgers, rounds). On a terminal
it shows a live bar (rich, which Flower installs) with elapsed time and time left; anywhere else
(logs, CI, pipes) it draws nothing, and only the lines a runner prints through `line()` (one per
epoch, per site, per round) appear, each ending in "[elapsed .., about .. left]".
`RoundLines` wraps the stream a Flower run's log is echoed to and adds such a line each time the
ServerApp logs a finished round, for the simulation runner and deploy.local.
"""

from __future__ import annotations

import re
import sys
import time
from typing import TextIO

from shared_model.util import duration, estimate


class Progress:
    """`total` units of work; `advance()` after each, `line(text)` for the lines that always print."""

    def __init__(self, total: int, *, label: str, stream: TextIO | None = None, bar: bool | None = None) -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.bar = _is_tty(self.stream) if bar is None else bar
        self.t0 = time.perf_counter()
        self._rich = self._task = None

    def __enter__(self) -> "Progress":
        self.t0 = time.perf_counter()
        if self.bar and self.total:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            from rich.progress import Progress as Bar

            self._rich = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("left"), TimeRemainingColumn(), console=Console(file=self.stream),
                             transient=True)
            self._rich.start()
            self._task = self._rich.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def status(self) -> str:
        return estimate(self.elapsed, self.done, self.total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, completed=min(self.done, self.total))

    def line(self, text: str, file: TextIO | None = None) -> None:
        """`text` [elapsed .., about .. left], above the bar on a terminal."""
        message = f"{text} [{self.status()}]"
        if self._rich is not None:
            self._rich.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=file or self.stream, flush=True)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


ROUND_DONE = re.compile(r"round (\d+): CIDEr-D")  # the ServerApp's log line after each round's evaluation


# the last line of a traceback that ends in FedCap's own, expected, failure (server_app.RunFailed: a run
# refused or failed for a reason its message and summary.md give)
EXPECTED_FAILURE = re.compile(r"^(?:\S*\.)?RunFailed: (.*)$")


class RoundLines:
    """A text stream that passes a Flower run's log through and, after each finished round (the
    ServerApp's "round k: CIDEr-D .." line), writes "[fedcap] round k/N done [elapsed .., about .. left]".
    The estimate starts at round 0's evaluation (the start of training). A Python traceback that
    ends in the ServerApp's own RunFailed (an expected failure: every site refused, a bad setting)
    is shown as its one-line message; any other traceback passes through whole."""

    def __init__(self, stream: TextIO, *, num_rounds: int) -> None:
        self.stream, self.num_rounds = stream, int(num_rounds)
        self.t0 = time.perf_counter()
        self.started: float | None = None  # round 0 evaluated: training starts
        self._partial = ""
        self._traceback: list[str] | None = None  # lines held while a traceback is being written

    def write(self, text: str) -> int:
        """Whole lines pass through (a partial one waits for its end), each followed by its round line."""
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            if self._traceback is not None or line.startswith("Traceback (most recent call last):"):
                self._held(line)
                continue
            self.stream.write(line + "\n")
            if m := ROUND_DONE.search(line):
                self._round(int(m.group(1)))
        return len(text)

    def _held(self, line: str) -> None:
        """Hold a traceback until its last line (the first that is not indented), then write it, or
        only the message of an expected failure."""
        if self._traceback is None or line.startswith((" ", "\t", "Traceback")) or not line.strip():
            self._traceback = [*(self._traceback or []), line]
            return
        held, self._traceback = self._traceback, None
        if m := EXPECTED_FAILURE.match(line.strip()):
            self.stream.write(f"[fedcap] run failed: {m.group(1)}\n")
        else:
            self.stream.write("\n".join([*held, line]) + "\n")

    def _round(self, k: int) -> None:
        now = time.perf_counter()
        if k == 0 or self.started is None:
            self.started = now
            if k == 0:
                self.stream.write(f"[fedcap] initial model evaluated [elapsed {duration(now - self.t0)}]\n")
                return
        per_round = (now - self.started) / k
        left = f", about {duration(per_round * (self.num_rounds - k))} left" if k < self.num_rounds else ""
        self.stream.write(f"[fedcap] round {k}/{self.num_rounds} done [elapsed {duration(now - self.t0)}{left}]\n")

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        """Write a last partial line (and a traceback cut short), if any."""
        if self._traceback:
            self.stream.write("\n".join(self._traceback) + "\n")
            self._traceback = None
        if self._partial:
            self.stream.write(self._partial)
            self._partial = ""
        self.stream.flush()
