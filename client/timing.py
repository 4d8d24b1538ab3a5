"""Where a message's time goes at a site: process start and imports, set-up, data, training, reply.

Flower starts a new `flwr-clientapp` process for every message in deployment, so the time before
the handler runs (interpreter, flwr and the app bundle) is part of each message's cost. It is read
from /proc (the process's start time against the system uptime) and reported with the handler's
own phases in the reply's "site" record (never in metrics: not aggregated), for the run summary.
"""

from __future__ import annotations

import os
import time


def seconds_since_process_start() -> float | None:
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class Phases:
    """`mark(name)` closes the phase that ran since the previous mark; `record()` gives them all."""

    def __init__(self) -> None:
        self.before = seconds_since_process_start()
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def record(self) -> dict[str, float]:
        out = {f"time-{k}": round(v, 3) for k, v in self.seconds.items()}
        if self.before is not None:
            out["time-before-handler"] = round(self.before, 3)
        return out
