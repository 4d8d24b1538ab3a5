"""One loopback deployment held open for a whole test module: `python -m deploy.local`'s own `main`
runs in a thread and, once its run has completed, waits inside its `after_run` hook (every process
still up) until the module's last test lets it go; `main` then stops every process by PID and
prints its closing lines, as it does for an operator. The helpers the fault tests share are here too."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from deploy.local import main as deploy_main
from runners.flower_runtime import descendants
from shared_model.privacy.ledger import PrivacyLedger


class HeldDeployment:
    """`deploy_main(argv)` in a daemon thread, held at its `after_run` hook: `deployment` and
    `result` are the live LoopbackDeployment and the completed run; `pids` and `defunct` what was
    running, and what Flower left <defunct>, the moment the run completed."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.deployment = self.result = None
        self.pids: list[int] = []
        self.defunct: list[str] = []
        self.code: int | None = None
        self.error: BaseException | None = None
        self._up, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._main, name="deploy-main", daemon=True)

    def _main(self) -> None:
        try:
            self.code = deploy_main(self.argv, after_run=self._hold)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e
        finally:
            self._up.set()  # also when main ended before its run completed

    def _hold(self, deployment, result) -> None:
        self.deployment, self.result = deployment, result
        self.pids = [p.pid for p in deployment.procs.values()]
        self.defunct = defunct_below(self.pids)
        self._up.set()
        self._release.wait()

    def start(self, *, timeout: float) -> None:
        self._thread.start()
        if not self._up.wait(timeout):
            raise AssertionError(f"python -m deploy.local had not completed its run after {timeout:.0f} s")
        if self.deployment is None:
            raise AssertionError(f"python -m deploy.local ended with {self.error or f'exit code {self.code}'} before "
                                 f"its run completed (its stderr is in this test's captured output)")

    def finish(self, *, timeout: float = 180) -> int | None:
        """Let `main` go on: it stops every process and prints its closing lines; its exit code."""
        self._release.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive() and self.deployment is not None:  # main is stuck: stop what it started
            self.deployment.stop()
        if self.error is not None:
            raise self.error
        return self.code


def defunct_below(pids: list[int]) -> list[str]:
    """The command names of the zombie processes below `pids`."""
    found = []
    for pid in {d for p in pids for d in descendants(p)}:
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            found.append(stat[stat.index("(") + 1: stat.rindex(")")])
    return found


# ---- for the fault tests -------------------------------------------------------------------------

def sgd_rounds(deployment, k: int, run_id: str | None = None) -> list[int]:
    """The rounds site k's ledger records as trained (for one run, or all)."""
    path = deployment.site_dir(k) / "state" / "ledger.jsonl"
    if not path.exists():
        return []
    return [r["server_round"] for r in PrivacyLedger(path).records()
            if r["kind"] == "dp-sgd" and (run_id is None or r["run_id"] == run_id)]


def wait_for(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def run_in_thread(deployment, config: dict, timeout: float) -> tuple[threading.Thread, dict]:
    """`deployment.run(config)` in a thread; the dict gets "result" or "error"."""
    out: dict = {}

    def target():
        try:
            out["result"] = deployment.run(config, timeout=timeout, stream_to=None)
        except Exception as e:  # noqa: BLE001 - handed to the test thread
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out
