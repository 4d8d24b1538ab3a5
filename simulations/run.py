"""Run a FedCap simulation with one command: `python -m simulations.run [SCENARIO.toml]`.

A scenario file holds run-config overrides of `[tool.flwr.app.config]` (only what differs from the
defaults) and, optionally, a `[federation]` table (`num-supernodes`, `client-resources-num-cpus`).
The runner sets up what Flower needs for a clean offline run (its own FLWR_HOME, no runtime
dependency install, no telemetry or update check, Ray temp folder), submits the run with
`flwr run . --stream` under a timeout, then checks the run's real status with `flwr list` (a
ServerApp failure still makes `flwr run --stream` exit 0), saves the resolved scenario beside the
results and names the run folder. `--stop-superlink` stops the local SuperLink that `flwr run`
starts and leaves running.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FEDERATION = {"num-supernodes": 4, "client-resources-num-cpus": 1}


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
    import socket

    found = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            found.append(s.getsockname()[1])
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


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of the local SuperLink that `flwr run` started for this FLWR_HOME (found by its log path)."""
    marker = str(flwr_home / "local-superlink")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [c.decode(errors="replace") for c in cmd]
        if any("flower-superlink" in a for a in args) and any(marker in a for a in args):
            pids.append(int(proc.name))
    return pids


def stop_superlink(flwr_home: Path) -> list[int]:
    pids = superlink_pids(flwr_home)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return pids


def load_scenario(paths: list[Path]) -> tuple[dict, dict]:
    """Merge scenario files (later wins) -> (run-config overrides, federation config)."""
    run_config, federation = {}, dict(DEFAULT_FEDERATION)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"scenario file not found: {path}")
        with open(path, "rb") as f:
            data = tomllib.load(f)
        federation.update(data.pop("federation", {}))
        run_config.update(data)
    known = _known_run_config_keys()
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ValueError(f"unknown run-config keys {unknown} (not in [tool.flwr.app.config] of pyproject.toml)")
    return run_config, federation


def _known_run_config_keys() -> set[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def run_simulation(scenarios: list[Path], *, output_dir: Path, timeout: float, overrides: dict | None = None,
                   flwr_home: Path | None = None, stream_to=sys.stdout) -> dict:
    """Submit one simulation, wait for it, and return {"run_id", "status", "run_dir", "log"}.

    Raises RuntimeError when the run did not finish with status 'finished:completed' or timed out."""
    flwr_home = (flwr_home or ROOT / ".fedcap" / "flwr-home").absolute()
    flwr_home.mkdir(parents=True, exist_ok=True)
    run_config, federation = load_scenario(scenarios)
    run_config.update(overrides or {})
    run_config["output-dir"] = str(output_dir.absolute())
    fed = " ".join(f"{k}={_toml_value(v)}" for k, v in federation.items())
    run_id, status, log = flwr_run(run_config, flower_env(flwr_home), timeout=timeout, stream_to=stream_to,
                                   extra_args=["--federation-config", fed])
    run_dir = output_dir.absolute() / f"run-{run_id}"
    if run_dir.is_dir():
        (run_dir / "scenario.json").write_text(json.dumps(
            {"scenarios": [str(s) for s in scenarios], "run-config": run_config, "federation": federation}, indent=2))
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} ended with status {status!r}; log tail:\n{log[-3000:]}")
    return {"run_id": run_id, "status": status, "run_dir": run_dir, "log": log}


def flwr_run(run_config: dict, env: dict[str, str], *, timeout: float, stream_to, connection: str | None = None,
             extra_args: list[str] = ()) -> tuple[str, str, str]:
    """`flwr run . [connection] --stream` with `run_config`, bounded by `timeout`; returns
    (run id, the run's real status from `flwr list`, the streamed log)."""
    config_file = write_run_config(run_config)
    cmd = ["flwr", "run", str(ROOT), *([connection] if connection else []), "--stream", "--run-config", config_file,
           *extra_args]
    lines: list[str] = []
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pump_output(proc, lines, stream_to, timeout)
    finally:
        os.unlink(config_file)
    log = "".join(lines)
    match = re.search(r"Successfully started run (\d+)", log)
    if not match:
        raise RuntimeError(f"flwr run did not start a run (exit {proc.returncode}):\n{log[-3000:]}")
    return match.group(1), run_status(match.group(1), env, connection), log


def write_run_config(run_config: dict) -> str:
    """`run_config` as a temporary TOML file for `flwr run --run-config` (the caller deletes it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        return f.name


def pump_output(proc: subprocess.Popen, lines: list[str], stream_to, timeout: float) -> None:
    """Collect (and echo) `flwr run --stream` output until it exits; kill it after `timeout` s."""
    import threading

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
                          "--format", "json"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise RuntimeError(f"could not read the status of run {run_id}: {out.stdout[-500:]} {out.stderr[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", type=Path, help="scenario TOML files (default: the embedded default)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the run is abandoned")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    parser.add_argument("--stop-superlink", action="store_true", help="only stop the local SuperLink and exit")
    args = parser.parse_args(argv)
    flwr_home = ROOT / ".fedcap" / "flwr-home"
    if args.stop_superlink:
        print(f"stopped SuperLink processes: {stop_superlink(flwr_home) or 'none running'}")
        return 0
    running_before = bool(superlink_pids(flwr_home))
    try:
        result = run_simulation(args.scenarios, output_dir=args.output_dir, timeout=args.timeout)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"simulation failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep_superlink and not running_before:
            stop_superlink(flwr_home)
    print(f"\nrun {result['run_id']} {result['status']}; outputs: {result['run_dir']}")
    print(f"summary: {result['run_dir'] / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
