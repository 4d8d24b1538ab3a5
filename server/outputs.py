"""A run's folder: per-round metrics (JSON Lines), a checkpoint per round, and the Markdown summary
with a plot of CIDEr-D and epsilon per round."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_model.model import save_checkpoint
from shared_model.util import json_safe, utc_now


class RunOutputs:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.federated_path = self.dir / "federated.jsonl"

    def save_run_config(self, run_config: dict[str, Any]) -> Path:
        path = self.dir / "run_config.json"
        path.write_text(json.dumps(json_safe(run_config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    def log_round(self, row: dict[str, Any]) -> None:
        _append_jsonl(self.metrics_path, row)

    def log_federated(self, server_round: int, per_site: dict[str, dict[str, float]],
                      aggregated: dict[str, float]) -> None:
        """Federated evaluation: each site's held-out metrics and their weighted mean."""
        _append_jsonl(self.federated_path, {"round": server_round, "time": utc_now(), "mean": aggregated,
                                            "sites": per_site})

    def rounds(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.metrics_path)

    def save_checkpoint(self, server_round: int, model, vocab) -> Path:
        path = save_checkpoint(self.dir / "checkpoints" / f"round-{server_round:04d}", model, vocab,
                               metadata={"kind": "federated", "server_round": server_round})
        latest = self.dir / "checkpoints" / "LATEST"
        tmp = latest.with_name(".LATEST.tmp")
        tmp.write_text(path.name + "\n")
        os.replace(tmp, latest)  # never a torn or empty LATEST
        return path

    def write_summary(self, *, run_config: dict[str, Any], strategy, ended: str, seconds: float,
                      extra: list[str] = ()) -> Path:
        """summary.md: how the run ended, every round's server-side metrics, federated evaluation,
        every site's failures (errors, refusals, rejected updates) and its budget as it reported it."""
        rows = self.rounds()
        metric_keys = ["BLEU-4", "ROUGE-L", "CIDEr-D", "loss"]
        lines = ["# FedCap run summary", "", f"- ended: {ended}", f"- wall time: {seconds:.0f} s",
                 f"- rounds trained: {len(strategy.trained_rounds)} of {run_config.get('num-server-rounds')}",
                 f"- strategy: {run_config.get('strategy')}, DP requested: {run_config.get('dp')} "
                 f"(each site's budget is its own: see below)", "",
                 "## Server-side evaluation per round", "",
                 "| round | " + " | ".join(metric_keys) + " | mean site epsilon |",
                 "|---" * (len(metric_keys) + 2) + "|"]
        for r in rows:
            vals = " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), (int, float)) else "" for k in metric_keys)
            eps = r.get("train-epsilon", "")
            lines.append(f"| {r['round']} | {vals} | {eps if isinstance(eps, str) else f'{eps:.3f}'} |")
        federated = _read_jsonl(self.federated_path)
        if federated:  # the weighted mean every round, each site in the last round
            last = federated[-1]
            rows_fed = [(r["round"], "weighted mean", r["mean"]) for r in federated]
            rows_fed += [(last["round"], site, m) for site, m in sorted(last["sites"].items())]
            lines += ["", "## Federated evaluation (each site's held-out split)", "",
                      "| round | site | " + " | ".join(metric_keys) + " | records |", "|---" * (len(metric_keys) + 3) + "|"]
            for rnd, site, m in rows_fed:
                vals = " | ".join(f"{m[k]:.4f}" if isinstance(m.get(k), (int, float)) else "" for k in metric_keys)
                lines.append(f"| {rnd} | {site} | {vals} | {int(m.get('num-examples', 0)) or ''} |")
        lines += _site_sections(strategy)
        lines += _timing_section(strategy)
        lines += list(extra)
        plot = self._plot(rows)
        if plot:
            lines += ["", f"![CIDEr-D and epsilon per round]({plot.name})"]
        lines.append("")
        (self.dir / "summary.md").write_text("\n".join(lines), encoding="utf-8")
        return self.dir / "summary.md"

    def _plot(self, rows: list[dict[str, Any]]) -> Path | None:
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = [r["round"] for r in rows]
        ax.plot(xs, [r.get("CIDEr-D", float("nan")) for r in rows], "o-", label="CIDEr-D (server)")
        ax.set_xlabel("round")
        ax.set_ylabel("CIDEr-D")
        eps = [r.get("train-epsilon") for r in rows]
        if any(isinstance(e, (int, float)) and math.isfinite(e) for e in eps):
            ax2 = ax.twinx()
            ax2.plot(xs, [e if isinstance(e, (int, float)) else float("nan") for e in eps], "s--", color="tab:red",
                     label="mean site epsilon")
            ax2.set_ylabel("epsilon")
        fig.tight_layout()
        path = self.dir / "rounds.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


@dataclass
class NothingTrained:
    """The strategy's reporting fields for a run that ended before round 1 (e.g. a failed private
    vocabulary round): no round trained, no budget reported, the failures as recorded."""

    failures: list[dict[str, Any]]
    trained_rounds: tuple = ()
    site_budget: dict = field(default_factory=dict)
    exhausted: frozenset = frozenset()
    timings: dict = field(default_factory=dict)


def _timing_section(strategy) -> list[str]:
    """Where each site's train message spent its time (seconds), per round: before the handler
    (process start, imports, app bundle), set-up, data, evaluation of the received model
    (evaluate-in-train), training, reply; overhead = all but evaluation and training."""
    timings = getattr(strategy, "timings", {})
    if not timings:
        return []
    phases = ("before-handler", "setup", "data", "evaluate", "train", "reply")
    lines = ["", "## Where each site's train message spent its time (s)", "",
             "| round | site | " + " | ".join(phases) + " | overhead |", "|---" * (len(phases) + 3) + "|"]
    for rnd, sites in sorted(timings.items()):
        for site, t in sorted(sites.items()):
            overhead = sum(v for k, v in t.items() if k not in ("train", "evaluate"))
            lines.append(f"| {rnd} | {site} | " + " | ".join(f"{t[k]:.2f}" if k in t else "" for k in phases)
                         + f" | {overhead:.2f} |")
    return lines


def _site_sections(strategy) -> list[str]:
    """Each site's budget as it reported it (reply metrics), then every failure of every round."""
    keys = ("epsilon", "delta", "target-epsilon", "epsilon-remaining", "run-epsilon-granted", "records-trained",
            "records-retired")
    lines = ["", "## Each site's budget, as the site reported it", "",
             "epsilon: the largest per-record lifetime epsilon after its last round; target-epsilon: its lifetime "
             "budget per record; run-epsilon-granted: this run's allowance; records retired: left out because "
             "they would pass the budget (docs/privacy.md).", "",
             "| site | " + " | ".join(keys) + " | budget exhausted |", "|---" * (len(keys) + 2) + "|"]
    for site, budget in sorted(strategy.site_budget.items()):
        vals = " | ".join(f"{budget[k]:.4g}" if k in budget else "" for k in keys)
        lines.append(f"| {site} | {vals} | {'yes' if site in strategy.exhausted else ''} |")
    if not strategy.site_budget:
        lines.append("| (no site reported a budget) |" + " |" * (len(keys) + 1))
    lines += ["", "## Sites that failed, refused or were rejected", ""]
    if not strategy.failures:
        return lines + ["none"]
    lines += ["| round | site | node | what | why |", "|---|---|---|---|---|"]
    for f in strategy.failures:
        why = str(f["reason"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {f['round']} | {f['site']} | {f['node']} | {f['kind']} | {why} |")
    return lines


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(row), sort_keys=True) + "\n")
        f.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
