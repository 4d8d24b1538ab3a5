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


_fresh_process = True  # a simulation's actors serve many messages; a deployment's process serves one


class Phases:
    """`mark(name)` closes the phase that ran since the previous mark; `record()` gives them all.
    The time before the handler counts only for the first message a process serves."""

    def __init__(self) -> None:
        global _fresh_process
        self.before = seconds_since_process_start() if _fresh_process else 0.0
        _fresh_process = False
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


def cap_threads(node_config) -> int:
    """Cap torch's intra-op threads at node_config `num-threads` when given (a site sharing its
    machine), and never above the CPUs this process may run on; returns the number used."""
    import torch

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = int(node_config.get("num-threads", 0) or 0) or torch.get_num_threads()
    threads = max(1, min(wanted, allowed))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
