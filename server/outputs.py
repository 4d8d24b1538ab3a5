"""A run's folder: per-round metrics (JSON Lines), a checkpoint per round (round-0000: the start),
`checkpoints/LATEST` (the last trained round) and `checkpoints/BEST` (server/selection.py), and the
Markdown summary with a plot of CIDEr-D and epsilon per round."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared_model.model.checkpoint import save_checkpoint
from shared_model.privacy.reply import BUDGET_METRICS
from shared_model.util import atomic_write, json_safe, utc_now

from .selection import SELECTION_METRIC, best_round


class RunOutputs:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.federated_path = self.dir / "federated.jsonl"
        self.checkpoints = self.dir / "checkpoints"

    def save_run_config(self, run_config: dict[str, Any]) -> Path:
        path = self.dir / "run_config.json"
        atomic_write(path, (json.dumps(json_safe(run_config), indent=2, sort_keys=True) + "\n").encode("utf-8"))
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

    def save_start(self, init) -> Path:
        """checkpoints/round-0000: the model the federation starts from (an InitialModel: fresh,
        init-from or resume-from), round 0's candidate for BEST. LATEST names trained rounds only."""
        return save_checkpoint(self.checkpoints / _round_name(0), init.model, init.vocab,
                               metadata={"kind": "start", "server_round": 0, **init.record()})

    def save_checkpoint(self, server_round: int, model, vocab) -> Path:
        """A trained round's checkpoint; LATEST names it."""
        path = save_checkpoint(self.checkpoints / _round_name(server_round), model, vocab,
                               metadata={"kind": "federated", "server_round": server_round})
        self._point("LATEST", path.name)
        return path

    def checkpoint_rounds(self) -> set[int]:
        """The rounds with a checkpoint folder holding its weights."""
        if not self.checkpoints.is_dir():
            return set()
        return {int(p.name[6:]) for p in self.checkpoints.glob("round-*")
                if p.name[6:].isdigit() and (p / "model.safetensors").is_file()}

    def best(self) -> dict[str, Any] | None:
        """The metrics row of the best scored round that has a checkpoint (server/selection.py)."""
        return best_round(self.rounds(), candidates=self.checkpoint_rounds())

    def update_best(self) -> dict[str, Any] | None:
        """Point checkpoints/BEST at the best round so far; its metrics row (None: none scored yet)."""
        best = self.best()
        if best is not None:
            self._point("BEST", _round_name(best["round"]))
        return best

    def best_line(self) -> str:
        """The end-of-run line naming BEST."""
        best = self.best()
        if best is None:
            return "BEST: none (no round with a checkpoint was scored)"
        return (f"BEST: {self.checkpoints / _round_name(best['round'])} (round {best['round']}, server-side "
                f"validation {_score(best)}): deploy it; continue training from LATEST")

    def _point(self, pointer: str, folder: str) -> None:
        atomic_write(self.checkpoints / pointer, (folder + "\n").encode())  # never a torn or empty pointer

    def write_summary(self, *, run_config: dict[str, Any], strategy, ended: str, seconds: float,
                      extra: list[str] = (), signal: str = "") -> Path:
        """summary.md: how the run ended, every round's server-side metrics, the best round (picked
        by `signal`, server/selection.py's selection_signal), federated evaluation, every site's
        failures (errors, refusals, rejected updates) and its budget as it reported it."""
        from shared_model.evaluation.evaluator import decoding

        rows = self.rounds()
        metric_keys = ["BLEU-4", "ROUGE-L", "CIDEr-D", "loss"]
        beam = run_config.get("eval-beam-size")
        decoded = f", {decoding(beam)}" if isinstance(beam, int) else ""  # every score depends on it
        lines = ["# FedCap run summary", "", f"- ended: {ended}", f"- wall time: {seconds:.0f} s",
                 f"- rounds trained: {len(strategy.trained_rounds)} of {run_config.get('num-server-rounds')}",
                 f"- strategy: {run_config.get('strategy')}, DP requested: {run_config.get('dp')} "
                 f"(each site's budget is its own: see below)", "",
                 "## Server-side evaluation per round", "",
                 f"Scored on the server's evaluation set{decoded} (eval-beam-size; `fedcap evaluate` "
                 f"defaults to the same).", "",
                 "| round | " + " | ".join(metric_keys) + " | mean site epsilon |",
                 "|---" * (len(metric_keys) + 2) + "|"]
        for r in rows:
            vals = " | ".join(f"{r[k]:.4f}" if isinstance(r.get(k), (int, float)) else "" for k in metric_keys)
            eps = r.get("train-epsilon", "")
            lines.append(f"| {r['round']} | {vals} | {eps if isinstance(eps, str) else f'{eps:.3f}'} |")
        lines += self._best_section(rows, signal)
        federated = _read_jsonl(self.federated_path)
        if federated:  # the weighted mean every round, each site in the last round
            last = federated[-1]
            rows_fed = [(r["round"], "weighted mean", r["mean"]) for r in federated]
            rows_fed += [(last["round"], site, m) for site, m in sorted(last["sites"].items())]
            lines += ["", f"## Federated evaluation (each site's held-out split{decoded})", "",
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

    def _best_section(self, rows: list[dict[str, Any]], signal: str) -> list[str]:
        """BEST, what picked it, and how it compares with round 0 and the last round."""
        lines = ["", "## Best round: checkpoints/BEST (deploy it; continue training from checkpoints/LATEST)", ""]
        best = best_round(rows, candidates=self.checkpoint_rounds())
        if best is None:
            return lines + ["No round with a checkpoint was scored: no BEST."]
        start, last = next((r for r in rows if r["round"] == 0), None), max(rows, key=lambda r: r["round"])
        lines += [f"- BEST: round {best['round']} (checkpoints/{_round_name(best['round'])}), "
                  f"{_score(best)}",
                  f"- picked by: {signal or 'server-side validation ' + SELECTION_METRIC}; higher is better, "
                  f"ties go to the earlier round; candidates: round 0 (the start) and every trained round",
                  f"- round 0, the start ({self._start()}): "
                  + (f"{_score(start)}{_gain(best, start)}" if start else "not scored")]
        if last["round"] > 0:
            lines.append(f"- last round, {last['round']}: {_score(last)}{_gain(best, last)}")
        else:
            lines.append("- no round trained: BEST is the start")
        return lines

    def _start(self) -> str:
        """Where round 0's model came from (init_checkpoint.json): fresh, init-from or resume-from."""
        path = self.dir / "init_checkpoint.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        source = record.get("source", "fresh")
        return f"{source} {record['checkpoint']}" if record.get("checkpoint") else source

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


def _round_name(server_round: int) -> str:
    return f"round-{server_round:04d}"


def _score(row: dict[str, Any]) -> str:
    value = row.get(SELECTION_METRIC)
    return f"{SELECTION_METRIC} {value:.4f}" if isinstance(value, (int, float)) else f"{SELECTION_METRIC} not scored"


def _gain(best: dict[str, Any], other: dict[str, Any]) -> str:
    """BEST's lead over `other` on the selection metric."""
    value = other.get(SELECTION_METRIC)
    if other["round"] == best["round"]:
        return " (this is BEST)"
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return ""
    return f" (BEST is {best[SELECTION_METRIC] - value:+.4f})"


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
    keys = BUDGET_METRICS
    lines = ["", "## Each site's budget, as the site reported it", "",
             "epsilon: a bound on every record's lifetime epsilon (a record in every mechanism of the site's ledger; the "
             "exact per-record figures stay at the site: fedcap audit); target-epsilon: its lifetime "
             "budget per record; run-epsilon-granted, run-epsilon-spent: this run's allowance and spend "
             "(docs/privacy.md); epsilon-remaining of a site that refused: its target-epsilon less its epsilon; "
             "non-private: a site without a budget (a `dp = false` baseline, no epsilon); a blank cell: the site "
             "did not report it.", "",
             "| site | " + " | ".join(keys) + " | budget exhausted |", "|---" * (len(keys) + 2) + "|"]
    for site, budget in sorted(strategy.site_budget.items()):
        budget = _as_shown(budget, exhausted=site in strategy.exhausted)
        vals = " | ".join(budget[k] if isinstance(budget.get(k), str) else f"{budget[k]:.4g}"
                          if isinstance(budget.get(k), (int, float)) else "" for k in keys)
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


def _as_shown(budget: dict[str, float], *, exhausted: bool) -> dict[str, float | str]:
    """A site's reported budget as the summary shows it. A non-private site (epsilon inf, client/
    privacy/reply.py's TrainMetrics.non_private) has no budget: "non-private" and "-", never a budget of 0. A
    site that refused for budget reports its spend and target but not what is left: derived from them."""
    eps = budget.get("epsilon")
    if isinstance(eps, float) and math.isinf(eps):
        return {k: "non-private" if k == "epsilon" else "-" for k in budget}
    shown: dict[str, float | str] = dict(budget)
    if exhausted and {"epsilon", "target-epsilon"} <= budget.keys():  # a refusal's spend, never an older round's
        shown["epsilon-remaining"] = max(0.0, budget["target-epsilon"] - budget["epsilon"])
    return shown


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(json_safe(row), sort_keys=True) + "\n")
        f.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
