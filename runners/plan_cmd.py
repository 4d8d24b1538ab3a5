"""`fedcap plan`: each site's DP plan and the noise-to-signal ratio of its steps, before any budget
is spent (public quantities only: record counts, the run config, the model's trainable size)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

PLAN_EXIT_CODES = "exit codes: 0 planned (warnings included); 2 bad arguments or no noise fits a site's allowance"


def add_plan_parser(sub) -> None:
    from .cli import HelpFormatter

    p = sub.add_parser("plan", help="each site's DP plan and noise-to-signal ratio, before any budget is spent",
                       description=__doc__.split("\n\n")[0], epilog=PLAN_EXIT_CODES, formatter_class=HelpFormatter)
    p.add_argument("--records", type=int, nargs="+", required=True, metavar="N", help="each site's number of records")
    p.add_argument("--run-config", type=Path, metavar="FILE",
                   help="a TOML file of run-config keys overriding pyproject.toml's [tool.flwr.app.config]")
    p.add_argument("--target-epsilon", type=float, help="the sites' lifetime budget (default: the run config's)")
    p.set_defaults(func=run_plan_cmd)


def run_plan_cmd(args: argparse.Namespace) -> int:
    from shared_model.run_settings import validate_run_config

    from .flower_runtime import default_run_config

    rc = default_run_config()
    if args.run_config is not None:
        rc.update(tomllib.loads(args.run_config.read_text(encoding="utf-8")))
    if args.target_epsilon:
        rc["target-epsilon"] = args.target_epsilon
    print_plan(validate_run_config(rc), args.records)
    return 0


def print_plan(rc: dict, records: list[int], *, out=print) -> list[int]:
    """Print each site's plan for the validated run config `rc` and sites of `records` records; the
    sites whose noise dominates."""
    from shared_model.data.synthetic import synthetic_vocabulary
    from shared_model.model.captioner import Captioner
    from shared_model.model.config import captioner_config_from_run_config
    from shared_model.model.trainable import set_trainable
    from client.settings import run_request, site_budget
    from shared_model.privacy.plan import LEVERS, NOISE_DOMINATES, site_plan

    model = Captioner(captioner_config_from_run_config(rc, vocab_size=len(synthetic_vocabulary(rc["data-scenario"]))))
    d = sum(p.numel() for p in set_trainable(model, rc["trainable"]))
    # the budget and the request exactly as a simulated site builds them from this run config
    budget = site_budget({**rc, "dp": True}, {"partition-id": 0, "num-partitions": 1})
    request = run_request(rc, {}, "plan")
    out(f"trainable = {rc['trainable']!r}: {d:,} parameters; run-epsilon {rc['run-epsilon']:g} of a lifetime "
        f"{budget.target_epsilon:g} (delta {budget.target_delta:g}, {budget.enforcing}); "
        f"{rc['num-server-rounds']} rounds x {rc['local-epochs']} local epochs, batch-size {rc['batch-size']}")
    out("| site | records | expected batch | steps per round | noise multiplier | noise / signal: step | run |")
    out("|---|---|---|---|---|---|---|")
    dominated = []
    for k, n in enumerate(records):
        plan = site_plan(records=n, request=request, budget=budget, trainable_parameters=d)
        flag = " **noise dominates**" if plan.noise_dominates else ""
        out(f"| {k} | {n} | {plan.expected_batch:.1f} | {plan.steps_per_round} | {plan.noise_multiplier:.3f} | "
            f"{plan.noise_to_signal:.2f} | {plan.run_noise_to_signal:.2f}{flag} |")
        if plan.noise_dominates:
            dominated.append(k)
    if dominated:
        out(f"warning: at sites {dominated} the noise added over the run is more than {NOISE_DOMINATES:g}x the "
            f"best the clipped signal can add up to: their updates will be mostly noise. Levers: "
            + "; ".join(LEVERS) + ". The ratio is a worst case, not a forecast: which lever helps depends on the "
            "data (on both embedded scenarios every parameter trainable beat a frozen encoder: docs/results.md), so "
            "rehearse them on public data first (fedcap rehearse).")
    return dominated
