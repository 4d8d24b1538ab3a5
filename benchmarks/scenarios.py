"""Both embedded scenarios through the product's own path: public pretraining, then real Flower
simulations (`simulations.run.run_simulation`) from that checkpoint, and centralized non-private
training from the same checkpoint; writes its block of docs/results.md and docs/results-scenarios.json.

    python benchmarks/scenarios.py                          # every row, both scenarios (~1 h on 2 CPU cores)
    python benchmarks/scenarios.py --scenario shifted       # one scenario
    python benchmarks/scenarios.py --rows "dp eps 8" sgd    # some rows (names as in ROWS)

Scenarios: `embedded` (the main job: 4 Dirichlet sites with feature skew, 4,000 records) and
`shifted` (simulations/scenarios/shifted.toml: 3 sites of ~360 records whose content the public set
rarely or never shows). Each starts from its own public checkpoint (the main job's pretraining,
`simulations.pretrained.pretrain_for`, cached in .fedcap/pretrained).

Rows (ROWS): federated DP at epsilon 8 and 2 per site with the run-config defaults; federated
non-private (simulations/scenarios/no-dp.toml's lr); and, at epsilon 8, one change each to the
defaults that issue 21 names (the local optimizer, its learning rate, the trainable set, a server
optimizer). Every federated row reports each round's server score (round 0: the public checkpoint),
the round `checkpoints/BEST` names, and the last round. Centralized non-private trains the sites'
records pooled (`train-size` of the scenario) from the same checkpoint, 6 epochs, lr 1e-3 cosine,
batch 64. Scores: the server's evaluation set (server-eval-size test images of the scenario),
greedy decoding, no METEOR; one seed (the run config's), so two rows differ by their settings, not
their draws.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIOS = {"embedded": [], "shifted": [ROOT / "simulations" / "scenarios" / "shifted.toml"]}
NO_DP = ROOT / "simulations" / "scenarios" / "no-dp.toml"
ROWS = {  # name -> (scenario files added, run-config overrides)
    "dp eps 8": ([], {}),
    "dp eps 2": ([], {"run-epsilon": 2.0, "target-epsilon": 2.0}),
    "non-private": ([NO_DP], {}),
    "dp eps 8, adamw lr 1e-3": ([], {"lr": 0.001}),
    "dp eps 8, sgd lr 0.1": ([], {"optimizer": "sgd", "lr": 0.1}),
    "dp eps 8, sgd lr 0.5": ([], {"optimizer": "sgd", "lr": 0.5}),
    "dp eps 8, fusion+decoder": ([], {"trainable": "fusion+decoder"}),
    "dp eps 8, fedavgm": ([], {"strategy": "fedavgm"}),
    "dp eps 8, local-epochs 4": ([], {"local-epochs": 4}),
    "dp eps 8, 6 rounds": ([], {"num-server-rounds": 6}),
}
CENTRAL = "centralized non-private"
MARKER = "<!-- scenarios table -->"


def federated(scenario: str, row: str, checkpoint: Path, out: Path, home: Path) -> dict:
    from runners.flower_runtime import RunFailed
    from simulations.run import run_simulation

    files, overrides = ROWS[row]
    t0 = time.perf_counter()
    try:
        result = run_simulation(SCENARIOS[scenario] + files, output_dir=out, timeout=3600, flwr_home=home,
                                stream_to=None, overrides={**overrides, "init-from": str(checkpoint)})
        run_dir = result["run_dir"]
    except RunFailed as e:
        print(e.log[-3000:], file=sys.stderr)
        raise
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best = int((run_dir / "checkpoints" / "BEST").read_text().strip().split("-")[1])
    scores = [r["CIDEr-D"] for r in rounds]
    return {"scores": scores, "best_round": best, "best": scores[best], "last": scores[-1],
            "max_site_epsilon": rounds[-1].get("max-site-epsilon"), "seconds": time.perf_counter() - t0}


def centralized(scenario: str, rc: dict, checkpoint: Path, out: Path) -> dict:
    from runners.centralized import CentralizedConfig, run_centralized
    from simulations.pretrained import model_overrides

    t0 = time.perf_counter()
    cfg = CentralizedConfig(source=scenario, train_size=int(rc["train-size"]), test_size=int(rc["server-eval-size"]),
                            seed=int(rc["seed"]), epochs=6, batch_size=64, lr=1e-3, lr_schedule="cosine",
                            beam_size=int(rc["eval-beam-size"]), meteor=False, init_from=str(checkpoint),
                            model=model_overrides(rc))
    result = run_centralized(cfg, out, log=lambda s: None)
    score = result["metrics"]["CIDEr-D"]
    return {"scores": [score], "best": score, "last": score, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    from shared_model.run_settings import default_run_config, validate_run_config
    from simulations.pretrained import pretrain_for
    from simulations.run import load_scenario, stop_superlink

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="(repeatable) default: both")
    p.add_argument("--rows", nargs="*", default=None, help=f"rows to run (default: all): {list(ROWS)} and {CENTRAL!r}")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--table-only", action="store_true", help="only rewrite the block from the JSON; run nothing")
    args = p.parse_args(argv)
    rows = args.rows if args.rows is not None else [*ROWS, CENTRAL]
    for row in rows:
        if row not in ROWS and row != CENTRAL:
            p.error(f"unknown row {row!r}: {list(ROWS)} or {CENTRAL!r}")
    json_path = args.out.with_name(args.out.stem + "-scenarios.json")
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"scenarios": {}}
    if args.table_only:
        write(args.out, doc)
        return 0
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedcap-scenarios-") as tmp:
        home = Path(tmp) / "flwr-home"
        try:
            for scenario in args.scenario or list(SCENARIOS):
                rc = validate_run_config({**default_run_config(), **load_scenario(SCENARIOS[scenario])[0]})
                t = time.perf_counter()
                checkpoint, public = pretrain_for(rc, log=lambda s: None)
                print(f"{scenario}: public checkpoint {checkpoint} ({time.perf_counter() - t:.0f} s)", flush=True)
                found = doc["scenarios"].setdefault(scenario, {"rows": {}})
                found["checkpoint"] = str(checkpoint)
                for row in rows:
                    t = time.perf_counter()
                    if row == CENTRAL:
                        r = centralized(scenario, rc, checkpoint, Path(tmp) / f"{scenario}-central")
                    else:
                        r = federated(scenario, row, checkpoint, Path(tmp) / scenario, home)
                        found["public_only"] = r["scores"][0]
                    r.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=_commit())
                    found["rows"][row] = r
                    print(f"{scenario:9} {row:28} best {r['best']:.3f} (round {r.get('best_round', '-')}) last "
                          f"{r['last']:.3f}  rounds {' / '.join(f'{s:.3f}' for s in r['scores'])}  "
                          f"{time.perf_counter() - t:.0f} s", flush=True)
                    json_path.write_text(json.dumps(doc, indent=2) + "\n")  # each row as soon as it is in
        finally:
            stop_superlink(home)
    doc.update(machine=platform.platform(), command="python benchmarks/scenarios.py " + " ".join(sys.argv[1:]))
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    write(args.out, doc)
    print(f"{time.perf_counter() - t_all:.0f} s")
    return 0


def write(path: Path, doc: dict) -> None:
    """The block between the two MARKERs of `path`: one table per scenario."""
    lines = [MARKER]
    for scenario, found in doc["scenarios"].items():
        central = found["rows"].get(CENTRAL, {}).get("best")
        lines += ["", f"**{scenario}** (public checkpoint .fedcap/pretrained/{Path(found.get('checkpoint', '')).parent.name}"
                  "; CIDEr-D, server evaluation set, greedy)", "",
                  "| model | rounds (0 = public only) | BEST (round) | last | BEST / centralized | date, commit |",
                  "|---|---|---|---|---|---|"]
        if "public_only" in found:
            lines.append(f"| public only | | {found['public_only']:.3f} (0) | | {_ratio(found['public_only'], central)} | |")
        order = [*ROWS, CENTRAL]
        for row, r in sorted(found["rows"].items(), key=lambda item: order.index(item[0])):
            rounds = " / ".join(f"{s:.3f}" for s in r["scores"]) if row != CENTRAL else ""
            best = f"{r['best']:.3f}" + (f" ({r['best_round']})" if "best_round" in r else "")
            lines.append(f"| {row} | {rounds} | {best} | {r['last']:.3f} | {_ratio(r['best'], central)} | "
                         f"{r['date'][:10]}, {r['commit']} |")
    lines.append(MARKER)
    block = "\n".join(lines)
    text = path.read_text()
    if MARKER in text:
        head, _, rest = text.partition(MARKER)
        text = head + block + rest.partition(MARKER)[2]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def _ratio(value, central) -> str:
    return f"{value / central:.2f}" if central else ""


def _commit() -> str:
    import subprocess

    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
