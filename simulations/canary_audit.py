"""Empirical privacy audit in one training run: `python -m simulations.canary_audit [--no-dp] [--canaries M]`.

Runs one federated simulation (the real ClientApp and ServerApp through `simulations.run`) in which
`canary-site` appends to its train split each of M canaries whose fair coin says "in", then scores
every canary against the final global model, turns the correct membership guesses into an epsilon
lower bound at 95% confidence (Steinke, Nasr and Jagielski 2023; shared_model/audit/canary_bound.py) and sets it
beside the theoretical epsilon recomputed from the canary site's ledger. A lower bound above the
theoretical epsilon is reported as a FAILURE (exit 1). Writes `canary_audit.json` into the run
folder. `--audit-only RUN_DIR` scores an existing run again without training. See
docs/empirical-audit.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from runners.flower_runtime import ROOT, stop_superlink, superlink_pids
from simulations.run import run_simulation

# What differs from pyproject's defaults: a small federation (2 sites of ~400 records) and enough
# local epochs that a non-private model memorizes its canaries; DP keeps the default budget
# (target-epsilon 8, delta 1e-5), calibrated over this whole plan.
AUDIT_CONFIG: dict[str, Any] = {
    "num-server-rounds": 5,
    "local-epochs": 8,
    "batch-size": 64,  # from-scratch training, not the fine-tuning defaults of pyproject
    "lr": 0.003,
    "train-size": 800,
    "partitioner": "iid",
    "server-eval-size": 100,
}
FEDERATION = {"num-supernodes": 2, "client-resources-num-cpus": 1}
DEFAULT_CANARIES = 500
CONFIDENCE = 0.95


def resolved_run_config(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run config as the ServerApp saw it, federation) from the run folder."""
    saved = json.loads((run_dir / "scenario.json").read_text())
    return json.loads((run_dir / "run_config.json").read_text()), saved["federation"]


def theoretical_epsilon(run_dir: Path, run_config: dict[str, Any], num_sites: int) -> dict[str, Any]:
    """The canaries' epsilon, recomputed from the canary site's ledger: the largest per-record
    epsilon among the canary records it holds (the events whose membership contained them)."""
    from client.site_data import simulated_site_data
    from shared_model.evaluation.canaries import included_canaries
    from shared_model.privacy.history import build_histories
    from shared_model.privacy.ledger import PrivacyLedger

    site = int(run_config["canary-site"])
    path = run_dir / "sites" / f"site-{site}" / "ledger.jsonl"
    ledger = PrivacyLedger(path)
    records = [r for r in ledger.records() if r["kind"] == "dp-sgd"]
    if not records:
        if run_config["dp"]:
            raise RuntimeError(f"DP run but no ledger records at {path}: the canary site never trained")
        return {"epsilon": math.inf, "delta": float(run_config["target-delta"]), "accountant": None, "rounds": 0}
    histories, _ = build_histories(ledger.records(), ledger.membership)
    train, _ = simulated_site_data(run_config, partition_id=site, num_partitions=num_sites)
    canaries = set(included_canaries(int(run_config["canary-count"]), seed=int(run_config["canary-seed"]),
                                     image_size=train.images.shape[1]).record_ids())
    groups = {g for g in histories.groups_of(canaries) if g >= 0}
    if not groups:
        raise RuntimeError(f"no line of {path} trained on the canary records")
    delta, accountant = float(records[-1]["target_delta"]), str(records[-1]["accountant"])
    worst = max(groups, key=lambda g: histories.epsilon(g, target_delta=delta, accountant=accountant))
    events = histories.group_events(worst)
    return {"epsilon": histories.epsilon(worst, target_delta=delta, accountant=accountant), "delta": delta,
            "accountant": accountant, "rounds": len(events), "noise_multiplier": events[-1].noise_multiplier,
            "sample_rate": events[-1].sample_rate, "steps": sum(e.steps for e in events)}


def audit_run(run_dir: Path) -> dict[str, Any]:
    """Score the canaries of a finished run against its final checkpoint and bound epsilon."""
    import numpy as np

    from shared_model.evaluation.canaries import canary_scores, draw_membership, make_canaries
    from shared_model.model.checkpoint import load_checkpoint
    from shared_model.audit.canary_bound import one_run_audit

    run_config, federation = resolved_run_config(run_dir)
    m, seed = int(run_config["canary-count"]), int(run_config["canary-seed"])
    if m < 1:
        raise ValueError(f"run {run_dir} has canary-count {m}: nothing to audit")
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    model, vocab, _ = load_checkpoint(run_dir / "checkpoints" / latest)
    canaries = make_canaries(m, seed=seed, image_size=model.config.image_size)
    included = draw_membership(m, seed=seed)
    scores = canary_scores(model, canaries, vocab)
    theory = theoretical_epsilon(run_dir, run_config, int(federation["num-supernodes"]))
    result = one_run_audit(scores, included, delta=theory["delta"], confidence=CONFIDENCE)
    bound, eps = result.epsilon_lower_bound, theory["epsilon"]
    if bound > eps:
        verdict = "FAILURE: the empirical lower bound exceeds the theoretical epsilon"
    elif math.isinf(eps):
        verdict = "non-private run: no guarantee to check (the bound shows how much the model memorized)"
    else:
        verdict = "consistent: lower bound <= theoretical epsilon"
    return {
        "run_dir": str(run_dir), "checkpoint": latest, "dp": bool(run_config["dp"]),
        "m": m, "canary_seed": seed, "canary_site": int(run_config["canary-site"]), "included": int(included.sum()),
        "k_plus": result.best.k_plus, "k_minus": result.best.k_minus, "guesses": result.best.guesses,
        "correct": result.best.correct, "confidence": CONFIDENCE, "guess_counts_tried": len(result.tried),
        "epsilon_lower_bound": bound, "theoretical_epsilon": eps if math.isfinite(eps) else "inf",
        "delta": theory["delta"], "accountant": theory["accountant"], "ledger": theory,
        "mean_loss_in": float(np.mean(scores[included])) if included.any() else None,
        "mean_loss_out": float(np.mean(scores[~included])) if (~included).any() else None,
        "tried": [{"k_plus": g.k_plus, "k_minus": g.k_minus, "correct": g.correct,
                   "epsilon_lower_bound": g.epsilon_lower_bound} for g in result.tried],
        "verdict": verdict,
    }


def format_report(report: dict[str, Any]) -> str:
    eps = report["theoretical_epsilon"]
    lines = [
        f"Canary audit of {report['run_dir']} ({report['checkpoint']}, {'DP' if report['dp'] else 'non-private'})",
        f"  canaries m = {report['m']} at site-{report['canary_site']}, {report['included']} included (seed "
        f"{report['canary_seed']}); mean loss in {report['mean_loss_in']:.3f}, out {report['mean_loss_out']:.3f}",
        "",
        "  k+    k-    guesses  correct  eps lower bound",
    ]
    for g in report["tried"]:
        mark = " <- best" if (g["k_plus"], g["k_minus"]) == (report["k_plus"], report["k_minus"]) else ""
        lines.append(f"  {g['k_plus']:<5} {g['k_minus']:<5} {g['k_plus'] + g['k_minus']:<8} {g['correct']:<8} "
                     f"{g['epsilon_lower_bound']:.3f}{mark}")
    lines += [
        f"  (each at level {1 - report['confidence']:.2f}/{report['guess_counts_tried']}, Bonferroni: the best is a "
        f"{report['confidence']:.0%} bound)",
        "",
        "| m | guesses | correct | eps lower bound (95%) | theoretical eps | delta | verdict |",
        "|---|---|---|---|---|---|---|",
        f"| {report['m']} | {report['guesses']} | {report['correct']} | {report['epsilon_lower_bound']:.3f} | "
        f"{eps if isinstance(eps, str) else f'{eps:.3f}'} | {report['delta']:g} | {report['verdict']} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.canary_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-dp", action="store_true", help="train without DP (the audit's positive control)")
    parser.add_argument("--canaries", type=int, default=DEFAULT_CANARIES, help="number of canaries m")
    parser.add_argument("--canary-seed", type=int, default=0)
    parser.add_argument("--canary-site", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "canary-audit")
    parser.add_argument("--flwr-home", type=Path, default=ROOT / ".fedcap" / "flwr-home")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the run is abandoned")
    parser.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    parser.add_argument("--audit-only", type=Path, metavar="RUN_DIR", help="score a finished run again, no training")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.audit_only:
        run_dir = args.audit_only.absolute()
    else:
        if args.canaries < 1:
            parser.error(f"--canaries must be >= 1, got {args.canaries}")
        overrides = {**AUDIT_CONFIG, "dp": not args.no_dp, "canary-count": args.canaries,
                     "canary-seed": args.canary_seed, "canary-site": args.canary_site}
        running_before = bool(superlink_pids(args.flwr_home.absolute()))
        with tempfile.TemporaryDirectory() as tmp:
            scenario = Path(tmp) / "canary-audit.toml"
            scenario.write_text("[federation]\n" + "".join(f"{k} = {v}\n" for k, v in FEDERATION.items()))
            try:
                result = run_simulation([scenario], output_dir=args.output_dir, timeout=args.timeout,
                                        overrides=overrides, flwr_home=args.flwr_home)
            except (RuntimeError, ValueError, FileNotFoundError) as e:
                print(f"simulation failed: {e}", file=sys.stderr)
                return 1
            finally:
                if not args.keep_superlink and not running_before:
                    stop_superlink(args.flwr_home.absolute())
        run_dir = result["run_dir"]
    try:
        report = audit_run(run_dir)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"audit failed: {e}", file=sys.stderr)
        return 1
    previous = run_dir / "canary_audit.json"
    if args.audit_only and previous.is_file():  # keep the time of the run that trained
        report["wall_time_s"] = json.loads(previous.read_text()).get("wall_time_s")
    else:
        report["wall_time_s"] = round(time.perf_counter() - t0, 1)
    (run_dir / "canary_audit.json").write_text(json.dumps(report, indent=2))
    print("\n" + format_report(report))
    print(f"\nwall time {report['wall_time_s']} s; written: {run_dir / 'canary_audit.json'}")
    return 1 if report["verdict"].startswith("FAILURE") else 0


if __name__ == "__main__":
    sys.exit(main())
