"""Driving Flower's command-line runtime from Python (no `flwr` import): one place for what
simulations, the canary audit and the loopback deployment all need.

- an offline environment per FLWR_HOME (no runtime dependency install, telemetry or update check;
  its own local SuperLink ports, so two FLWR_HOMEs never share, and stop, one SuperLink);
- processes found through /proc and stopped by PID with their children, waiting until they exit;
- `flwr run` under a timeout plus the run's real status from `flwr list` (`flwr run --stream`
  exits 0 even when the ServerApp failed);
- the app's run-config defaults (shared_model/run_settings.py reads them from pyproject.toml).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shared_model.run_settings import default_run_config  # noqa: F401 - the programs' one door to the defaults

ROOT = Path(__file__).resolve().parents[1]


# ---- the app's configuration --------------------------------------------------------------------

def eval_beam_size() -> int:
    """The server's `eval-beam-size`: the decoding every `fedcap` command scores and captions with by
    default, so one checkpoint has one score (summary.md's, `fedcap evaluate`'s, `fedcap train`'s)."""
    return int(default_run_config()["eval-beam-size"])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def write_run_config(run_config: dict[str, Any]) -> str:
    """`run_config` as a temporary flat TOML file for `flwr run --run-config` (the caller deletes it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        return f.name


# ---- environment and ports ----------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_superlink_ports(flwr_home: Path) -> tuple[int, int]:
    """The ports of this FLWR_HOME's local SuperLink (HTTP API, Control API), chosen free once and
    kept in FLWR_HOME/fedcap-ports.json. Flower's fixed default (39091) would make every FLWR_HOME
    share, and stop, one SuperLink."""
    path = flwr_home / "fedcap-ports.json"
    try:
        ports = json.loads(path.read_text())
        return int(ports["http"]), int(ports["control"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = [free_port(), free_port()]
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"http": found[0], "control": found[1]}))
    return found[0], found[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    http_port, control_port = local_superlink_ports(flwr_home)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_TMPDIR": env.get("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / "fedcap-ray")),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


# ---- processes ----------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below `pid` (found through /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pids(pids: list[int], *, grace: float = 15.0) -> None:
    """SIGTERM `pids` and their children, wait until they exit, SIGKILL whatever is left after `grace` s."""
    everything = []
    for pid in pids:
        everything += [pid, *descendants(pid)]
    for pid in everything:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in everything):
        time.sleep(0.2)
    for pid in everything:
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the local SuperLink that `flwr run` started for this FLWR_HOME (found by its log path)."""
    marker = str(flwr_home / "local-superlink")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = [c.decode(errors="replace") for c in (proc / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if any("flower-superlink" in a for a in args) and any(marker in a for a in args) and alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def stop_superlink(flwr_home: Path, *, grace: float = 30.0) -> list[int]:
    """Stop this FLWR_HOME's local SuperLink and wait until it has exited (so that a run started right
    after does not find the dying one)."""
    pids = superlink_pids(flwr_home)
    stop_pids(pids, grace=grace)
    return pids


# ---- runs ---------------------------------------------------------------------------------------

class RunFailed(RuntimeError):
    """A run whose real status is not finished:completed; carries what a caller needs to report it."""

    def __init__(self, run_id: str, status: str, run_dir: Path | None, log: str) -> None:
        summary = run_dir / "summary.md" if run_dir is not None else None
        ended = None
        if summary is not None and summary.is_file():  # the run's own account of how it ended
            ended = next((line[2:] for line in summary.read_text(encoding="utf-8").splitlines()
                          if line.startswith("- ended: ")), None)
        super().__init__(f"run {run_id} ended with status {status!r}"
                         + (f"; {ended}; summary: {summary}" if ended else f"; log tail:\n{log[-3000:]}"))
        self.run_id, self.status, self.run_dir, self.log = run_id, status, run_dir, log


def flwr_run(run_config: dict[str, Any], env: dict[str, str], *, timeout: float, stream_to,
             connection: str | None = None, extra_args: list[str] = (), app: Path = ROOT) -> tuple[str, str, str]:
    """`flwr run APP [connection] --stream` with `run_config`, bounded by `timeout`; returns
    (run id, the run's real status from `flwr list`, the streamed log)."""
    config_file = write_run_config(run_config)
    cmd = ["flwr", "run", str(app), *([connection] if connection else []), "--stream", "--run-config", config_file,
           *extra_args]
    lines: list[str] = []
    proc = subprocess.Popen(cmd, env=env, cwd=app, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pump_output(proc, lines, stream_to, timeout)
    finally:
        os.unlink(config_file)
    log = "".join(lines)
    match = re.search(r"Successfully started run (\d+)", log)
    if not match:
        raise RuntimeError(f"flwr run did not start a run (exit {proc.returncode}):\n{log[-3000:]}")
    return match.group(1), run_status(match.group(1), env, connection), log


def pump_output(proc: subprocess.Popen, lines: list[str], stream_to, timeout: float) -> None:
    """Collect (and echo) a process's output until it exits; kill it after `timeout` s."""
    def reader() -> None:
        for line in proc.stdout:
            lines.append(line)
            if stream_to is not None:
                stream_to.write(line)
                stream_to.flush()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        t.join(5)
        raise RuntimeError(f"run did not finish within {timeout:.0f} s (a run whose min nodes exceed the "
                           f"federation size waits forever); log tail:\n{''.join(lines)[-3000:]}") from None
    t.join(5)


def run_status(run_id: str, env: dict[str, str], connection: str | None = None) -> str:
    """The run's real status from the SuperLink, e.g. 'finished:completed' or 'finished:failed'."""
    out = subprocess.run(["flwr", "list", *([connection] if connection else []), "--run-id", run_id,
                          "--format", "json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise RuntimeError(f"could not read the status of run {run_id}: {out.stdout[-500:]} {out.stderr[-500:]}")
