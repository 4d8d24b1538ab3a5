"""Run a FedCap simulation with one command: `python -m simulations.run [SCENARIO.toml]`.

A scenario file holds run-config overrides of `[tool.flwr.app.config]` (only what differs from the
defaults) and, optionally, a `[federation]` table (`num-supernodes`, `client-resources-num-cpus`).
The runner sets up what Flower needs for a clean offline run (its own FLWR_HOME, no runtime
dependency install, no telemetry or update check, Ray temp folder), submits the run with
`flwr run . --stream` under a timeout, then checks the run's real status with `flwr list` (a
ServerApp failure still makes `flwr run --stream` exit 0), saves the resolved scenario beside the
results and names the run folder. `--stop-superlink` stops the local SuperLink that `flwr run`
starts and leaves running.

Unless `--no-pretrain` is given or the scenario sets `init-from` itself, the main job first
pretrains the captioner on the embedded generator's public variant (non-private, no site budget
spent; cached under .fedcap/pretrained/, simulations/pretrained.py) and starts the federation from
that checkpoint; the summary then shows the public-only score beside the federated one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

from shared_model.run_settings import validate_run_config
from runners.flower_runtime import (ROOT, RunFailed, default_run_config, flower_env, flwr_run,
                                                 stop_superlink, superlink_pids, toml_value)
from runners.progress import RoundLines

PATH_KEYS = ("site-state-dir", "federation-state", "resume-from", "init-from", "vocab-file", "server-eval-data")
DEFAULT_FEDERATION = {"num-supernodes": 4, "client-resources-num-cpus": 1}


def load_scenario(paths: list[Path]) -> tuple[dict, dict]:
    """Merge scenario files (later wins) -> (run-config overrides, federation config)."""
    run_config, federation = {}, dict(DEFAULT_FEDERATION)
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"scenario file not found: {path}")
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"scenario file {path} is not valid TOML: {e}") from None
        federation.update(data.pop("federation", {}))
        run_config.update(data)
    validate_run_config({**default_run_config(), **run_config})  # the ServerApp's own schema, before Flower starts
    return run_config, federation


def run_simulation(scenarios: list[Path], *, output_dir: Path, timeout: float, overrides: dict | None = None,
                   flwr_home: Path | None = None, stream_to=sys.stdout) -> dict:
    """Submit one simulation, wait for it, and return {"run_id", "status", "run_dir", "log"}.

    Raises RunFailed (a RuntimeError holding run_id, status, run_dir and log) when the run did not
    finish with status 'finished:completed', RuntimeError when it timed out, TypeError/ValueError
    naming the key for a bad setting (checked before Flower starts)."""
    flwr_home = (flwr_home or ROOT / ".fedcap" / "flwr-home").absolute()
    flwr_home.mkdir(parents=True, exist_ok=True)
    run_config, federation = load_scenario(scenarios)
    run_config.update(overrides or {})
    validate_run_config({**default_run_config(), **run_config})
    run_config["output-dir"] = str(output_dir.absolute())
    for key in PATH_KEYS:  # the apps run in Flower's own folders: relative paths mean the project root
        if run_config.get(key) and not Path(str(run_config[key])).expanduser().is_absolute():
            run_config[key] = str(ROOT / str(run_config[key]))
    fed = " ".join(f"{k}={toml_value(v)}" for k, v in federation.items())
    run_id, status, log = flwr_run(run_config, flower_env(flwr_home), timeout=timeout, stream_to=stream_to,
                                   extra_args=["--federation-config", fed])
    run_dir = output_dir.absolute() / f"run-{run_id}"
    if run_dir.is_dir():
        (run_dir / "scenario.json").write_text(json.dumps(
            {"scenarios": [str(s) for s in scenarios], "run-config": run_config, "federation": federation}, indent=2))
    if status != "finished:completed":
        raise RunFailed(run_id, status, run_dir, log)
    return {"run_id": run_id, "status": status, "run_dir": run_dir, "log": log}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", type=Path, help="scenario TOML files (default: the embedded default)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the run is abandoned")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    parser.add_argument("--stop-superlink", action="store_true", help="only stop the local SuperLink and exit")
    parser.add_argument("--no-pretrain", action="store_true",
                        help="start from a fresh model instead of the public pretrained checkpoint")
    parser.add_argument("--plan", action="store_true",
                        help="only print each simulated site's DP plan and noise-to-signal ratio, then exit")
    args = parser.parse_args(argv)
    flwr_home = ROOT / ".fedcap" / "flwr-home"
    if args.stop_superlink:
        print(f"stopped SuperLink processes: {stop_superlink(flwr_home) or 'none running'}")
        return 0
    try:
        _print_plan(args.scenarios)
        if args.plan:
            return 0
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"simulation failed: {e}", file=sys.stderr)
        return 1
    running_before = bool(superlink_pids(flwr_home))
    try:
        overrides, public = _public_start(args)
        rounds = {**default_run_config(), **load_scenario(args.scenarios)[0], **overrides}["num-server-rounds"]
        result = run_simulation(args.scenarios, output_dir=args.output_dir, timeout=args.timeout,
                                overrides=overrides, stream_to=RoundLines(sys.stdout, num_rounds=rounds))
    except (RuntimeError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"simulation failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep_superlink and not running_before:
            stop_superlink(flwr_home)
    if public is not None:
        from .pretrained import append_comparison

        print("\n" + append_comparison(result["run_dir"], public))
    print(f"\nrun {result['run_id']} {result['status']}; outputs: {result['run_dir']}")
    print(f"summary: {result['run_dir'] / 'summary.md'}")
    return 0


def _print_plan(scenarios: list[Path]) -> list[int] | None:
    """Before anything is spent: each simulated site's DP plan (fedcap plan), from its partition's
    size; None for a run without DP."""
    from client.site_data import simulated_site_data
    from runners.plan_cmd import print_plan

    overrides, federation = load_scenario(scenarios)
    rc = validate_run_config({**default_run_config(), **overrides})
    if not rc["dp"]:
        return None
    n = int(federation["num-supernodes"])
    sizes = [len(simulated_site_data(rc, partition_id=k, num_partitions=n)[0]) for k in range(n)]
    print("Each site's DP plan (public quantities only; docs/finetuning.md, 'Before spending'):")
    dominated = print_plan(rc, sizes)
    print(flush=True)
    return dominated


def _public_start(args: argparse.Namespace) -> tuple[dict, dict | None]:
    """(run-config overrides, pretraining result): init-from the cached public checkpoint, unless
    --no-pretrain or the scenario names its own init-from / resume-from."""
    run_config, _ = load_scenario(args.scenarios)
    if args.no_pretrain or run_config.get("init-from") or run_config.get("resume-from"):
        return {}, None
    from .pretrained import pretrain_for

    checkpoint, public = pretrain_for({**default_run_config(), **run_config})
    return {"init-from": str(checkpoint.absolute())}, public


if __name__ == "__main__":
    sys.exit(main())
