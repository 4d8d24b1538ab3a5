"""`fedcap rehearse`: the planned federation rehearsed on public data over a small grid of settings
(learning rate, local epochs, trainable set, optimizer), before any site budget is spent. Prints the
grid as a table and writes the chosen settings as a run-config file.

Sites of the real sites' sizes (--records, as for `fedcap plan`) are cut from public records; each
trains with the site's own DP rules (its noisy count, grant, noise multiplier, sample rate, steps,
clipping) in temporary ledgers, FedAvg joins them, and the server's evaluation scores every round
(simulations/rehearsal.py). The chosen point has the highest best-round CIDEr-D (ties: fewer
trainable parameters); when no point scores above round 0, none is chosen and the run config's own
settings are written, with a warning. Public data only: no site budget is spent."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REHEARSE_EXIT_CODES = ("exit codes: 0 rehearsed, settings written; 2 bad arguments or grid values (checked before "
                       "any training), or no noise fits a site's allowance")
# The embedded public variant of seed + 1 (other scenes, the same blur, a colour cast of its own): public
# scenes the default public checkpoint (pretrained on seed's stream) never saw, as a site's records are.
PUBLIC_SEED_OFFSET = 1


def add_rehearse_parser(sub) -> None:
    from shared_model.data.formats import FORMATS

    from .cli import HelpFormatter
    from .pretrain import pretrain_config

    p = sub.add_parser("rehearse", help="rehearse the federation on public data over a grid of settings; write the "
                                        "chosen ones as a run config (no site budget spent)",
                       description=__doc__,
                       epilog=REHEARSE_EXIT_CODES, formatter_class=HelpFormatter)
    p.add_argument("--records", type=int, nargs="+", required=True, metavar="N",
                   help="each real site's number of records (public: the server learns it from num-examples)")
    grid = p.add_argument_group("the grid (each defaults to the run config's single value)")
    grid.add_argument("--lr", type=float, nargs="+", metavar="LR", help="learning rates")
    grid.add_argument("--local-epochs", type=int, nargs="+", metavar="E", help="local epochs per round")
    grid.add_argument("--trainable", nargs="+", metavar="SET", help="trainable sets: all, decoder, fusion+decoder")
    grid.add_argument("--optimizer", nargs="+", metavar="OPT", help="local optimizers: adamw, sgd")
    p.add_argument("--rounds", type=int, help="num-server-rounds of the planned run (the noise is calibrated over "
                                              "all of them; default: the run config's)")
    p.add_argument("--public-data", type=Path, nargs="+", metavar="DIR",
                   help="public dataset folders (docs/data.md) to cut the sites from; rounds are scored on their "
                        "held-out split (or on server-eval-data when the run config names it). Default: the "
                        "embedded public variant, scored on the server's evaluation set")
    p.add_argument("--format", default=pretrain_config().data_format, choices=FORMATS, help="--public-data's format")
    p.add_argument("--init-from", type=Path, metavar="CKPT",
                   help="the checkpoint the federation will start from (fedcap pretrain); its model keys become the "
                        "run config's (default: the run config's init-from, else a fresh model)")
    p.add_argument("--run-config", type=Path, metavar="FILE",
                   help="a TOML file of run-config keys (flat or a [tool.flwr.app.config] table) overriding "
                        "pyproject.toml's; they are written to --out too")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every grid point's scores and plan as JSON")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.toml",
                   help="the chosen run config: flwr run . --run-config FILE.toml, python -m simulations.run "
                        "FILE.toml, python -m deploy.local --run-config FILE.toml")
    p.set_defaults(func=run_rehearse_cmd)


def run_rehearse_cmd(args: argparse.Namespace) -> int:
    from deploy.local import run_overrides
    from shared_model.privacy.site_budget import BudgetExhaustedError
    from shared_model.run_settings import validate_run_config
    from simulations.rehearsal import GRID_KEYS, grid_points, rehearse

    from .centralized import resolve_device
    from .flower_runtime import default_run_config
    from .progress import Progress

    if any(n < 1 for n in args.records):
        raise ValueError(f"--records must be site sizes >= 1, got {args.records}")
    if args.out.suffix != ".toml":
        raise ValueError(f"--out must name a .toml file (flwr run reads only those), got {str(args.out)!r}")
    # --run-config, then --init-from and its checkpoint's model keys: deploy.local's rule
    overrides = run_overrides(argparse.Namespace(run_config=args.run_config, server_eval_data=None, image_size=None,
                                                 init_from=args.init_from, format=args.format))
    if args.rounds is not None:
        overrides["num-server-rounds"] = args.rounds
    rc = validate_run_config({**default_run_config(), **overrides})
    grid = {k: v for k, v in {"lr": args.lr, "local-epochs": args.local_epochs, "trainable": args.trainable,
                              "optimizer": args.optimizer}.items() if v}
    points = grid_points(rc, grid)  # every value checked before any data is loaded
    public, held_out, where = _data(rc, args, sum(args.records))
    print(f"rehearsal on public data: {len(args.records)} sites of {args.records} records, {rc['num-server-rounds']} "
          f"rounds, {len(points)} grid points, start: {rc['init-from'] or 'a fresh model'}; each round scored on "
          f"{where}. No site budget is spent (temporary ledgers only).", flush=True)
    with Progress(len(points) * rc["num-server-rounds"], label="rehearsal", stream=sys.stderr) as bar:
        def on_round(point: int, server_round: int, score: float) -> None:
            bar.advance()
            bar.line(f"grid point {point + 1}/{len(points)}, round {server_round}: CIDEr-D {score:.4f}")

        try:
            result = rehearse(rc, public=public, held_out=held_out, records=args.records, grid=grid,
                              device=str(resolve_device(args.device)), on_round=on_round)
        except BudgetExhaustedError as e:
            raise ValueError(str(e)) from None
    table = result.table()
    chosen = result.chosen
    if chosen is None:  # nothing to choose by: the run config's own settings, said so
        written = {**overrides, **{k: rc[k] for k in GRID_KEYS}}
        verdict = (f"no grid point scored above round 0 ({result.points[0].scores[0]:.4f}) on {where}: the public "
                   f"sites cannot rank these settings for yours (their data loses under every point). Kept the run "
                   f"config's: " + ", ".join(f"{k} = {rc[k]!r}" for k in GRID_KEYS) +
                   ". Rehearse on public data closer to the sites' (--public-data), or keep the defaults")
    else:
        written = {**overrides, **chosen.settings}
        verdict = ("chosen: " + ", ".join(f"{k} = {v!r}" for k, v in chosen.settings.items()) +
                   f" (best CIDEr-D {chosen.best_score:.4f} at round {chosen.best_round}; round 0 "
                   f"{chosen.scores[0]:.4f})")
    validate_run_config({**default_run_config(), **written})
    _write_run_config(args.out, written, header=[
        "fedcap rehearse: settings chosen on public data (no site budget spent)",
        f"sites of {args.records} records, {rc['num-server-rounds']} rounds; best-round CIDEr-D on {where}", "",
        *table.splitlines(), "", verdict])
    print("\n" + table + "\n")
    print(("warning: " if chosen is None else "") + verdict)
    print(f"wrote {args.out}: flwr run . --run-config {args.out} | python -m simulations.run {args.out} | "
          f"python -m deploy.local --run-config {args.out}")
    if args.json:
        _write_json(args.json, result, overrides=overrides, held_out=where)
    return 0


def _data(rc: dict, args: argparse.Namespace, total: int):
    """(public training records, held-out records, what the held-out set is, in words)."""
    from server.server_data import server_eval_set
    from shared_model.data.public import load_public

    from .sources import training_data

    size = rc["image-size"]
    if args.public_data:
        for folder in args.public_data:
            if not folder.expanduser().is_dir():
                raise FileNotFoundError(f"--public-data folder not found: {folder}")
        public, held_out, _ = training_data(source="public", data=[str(f.expanduser()) for f in args.public_data],
                                            data_format=args.format, train_size=total,
                                            test_size=rc["server-eval-size"], seed=rc["seed"], image_size=size)
        where = f"{len(held_out)} held-out records of the public data"
    else:
        public = load_public(total, seed=rc["seed"] + PUBLIC_SEED_OFFSET, image_size=size,
                             scenario=rc["data-scenario"])
        held_out, where = None, ""
    if held_out is None or rc["server-eval-data"]:  # the server's own evaluation set, the signal BEST uses
        held_out = server_eval_set(rc, image_size=size)
        where = f"{len(held_out)} records of the server's evaluation set ({rc['server-eval-data'] or rc['data-scenario'] + ' test split'})"
    return public, held_out, where


def _write_run_config(path: Path, settings: dict, *, header: list[str]) -> None:
    from shared_model.util import atomic_write

    from .flower_runtime import toml_value

    text = "".join(f"# {line}".rstrip() + "\n" for line in header)
    text += "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())
    atomic_write(path, text.encode("utf-8"))


def _write_json(path: Path, result, *, overrides: dict, held_out: str) -> None:
    from dataclasses import asdict

    from shared_model.util import atomic_write

    points = [{**asdict(p), "best_round": p.best_round, "best_score": p.best_score, "final_score": p.final_score}
              for p in result.points]
    data = {"records": result.records, "rounds": result.rounds, "held-out": held_out, "run-config": overrides,
            "points": points, "chosen": None if result.chosen is None else result.points.index(result.chosen)}
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
