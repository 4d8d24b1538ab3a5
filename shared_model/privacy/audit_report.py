"""An audit's outputs: a terminal table, JSON (full precision) and a Markdown report with a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared_model.util import json_safe

from .ledger_audit import AuditResult

FORMAT = "fedcap-audit/1"
MECHANISM = ("Privacy unit: one record (an image with all its captions) of one site's dataset, add/remove "
             "neighbours. Mechanism: per ledger record, `steps` DP-SGD steps, each a Poisson-sampled Gaussian "
             "(SelfComposed(PoissonSampled(sample_rate, Gaussian(noise_multiplier)), steps)); a dataset's "
             "epsilon composes every record with its fingerprint, across rounds and runs.")


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(result: AuditResult) -> tuple[list[str], list[list[str]]]:
    header = ["site", "dataset", "rounds", "runs", *(f"eps {a}" for a in result.accountants), "budget",
              "remaining", "status"]
    rows = []
    for s in result.sites:
        if s.error:
            rows.append([s.site, "-", "-", "-", *("-" for _ in result.accountants), "-", "-", "ERROR"])
        elif not s.datasets:
            rows.append([s.site, "(empty)", "0", "0", *("-" for _ in result.accountants), "-", "-", "ok"])
        for d in s.datasets:
            rows.append([s.site, d.dataset_fingerprint[:12], str(d.rounds), str(len(d.run_ids)),
                         *(_num(d.epsilon[a]) for a in result.accountants), f"{d.target_epsilon:g}",
                         _num(d.remaining), d.status if d.status == "ok" else d.status.upper()])
    return header, rows


def _finding_lines(result: AuditResult) -> list[str]:
    return [f"{f.severity.upper()} [{f.kind}] {f.site}"
            + (f" {f.dataset_fingerprint[:12]}" if f.dataset_fingerprint else "") + f": {f.message}"
            for f in result.findings]


def format_table(result: AuditResult) -> str:
    """Plain text: aligned columns, then every finding, then the overall status."""
    header, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {i for i, h in enumerate(header) if h in ("rounds", "runs", "budget", "remaining") or h.startswith("eps")}

    def line(cells: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(cells).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows), ""]
    out += _finding_lines(result) or ["no findings"]
    out.append(f"status: {result.status} (epsilon at each dataset's target_delta; remaining = budget - epsilon with "
               f"the site's accountant; tolerance {result.tolerance:g} between accountants)")
    return "\n".join(out)


def to_json(result: AuditResult, *, strict: bool = False) -> dict[str, Any]:
    """Machine-readable: every recomputed and recorded epsilon, every finding, at full precision."""
    return json_safe({"format": FORMAT, "status": result.status, "exit_code": result.exit_code(strict=strict),
                   "accountants": list(result.accountants), "tolerance": result.tolerance,
                   "record_tolerance": result.record_tolerance,
                   "sites": [asdict(s) for s in result.sites], "findings": [asdict(f) for f in result.findings]})


def write_report(result: AuditResult, out_dir: str | Path) -> Path:
    """`audit.md` (table, findings, mechanism, accountants, per-site records) and `epsilon.png`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(result)
    md = ["# FedCap privacy-budget audit", "", f"Status: **{result.status}**", "",
          "| " + " | ".join(header) + " |", "|---" * len(header) + "|", *("| " + " | ".join(r) + " |" for r in rows),
          "", "## Findings", ""]
    md += [f"- {line}" for line in _finding_lines(result)] or ["None."]
    md += ["", "## What was recomputed", "", MECHANISM, "",
           f"Accountants: {', '.join(result.accountants)} (prv: Opacus PRV, tight; pld: dp_accounting PLD, tight; "
           f"rdp/dp-rdp: RDP, upper bounds), each at the dataset's target_delta. Recorded epsilons are compared, "
           f"never used. prv and pld must agree within {result.tolerance:g} (relative); records and budgets are "
           f"compared with the site's own accountant within {result.record_tolerance:g} (relative)."]
    for s in result.sites:
        md += ["", f"## {s.site}", "", f"- ledger: `{s.path}`"]
        if s.error:
            md += ["", f"Not audited: {s.error}"]
            continue
        md += [f"- last hash: `{s.last_hash}` (compare with a copy kept elsewhere)"]
        for d in s.datasets:
            md += ["", f"### Dataset `{d.dataset_fingerprint}`", "",
                   f"Budget: epsilon {d.target_epsilon:g} at delta {d.target_delta:g}, site accountant "
                   f"{d.accountant}; runs: {', '.join(d.run_ids)}", "",
                   "| round | line | run | server round | accountant | recorded epsilon | recomputed epsilon |",
                   "|---|---|---|---|---|---|---|"]
            md += [f"| {i} | {c.line} | {c.run_id} | {c.server_round} | {c.accountant} | {c.recorded_epsilon:.6f} | "
                   f"{_num(c.recomputed_epsilon, 6)} |" for i, c in enumerate(d.records, 1)]
    if _plot(result, out / "epsilon.png"):
        md += ["", "![Recomputed cumulative epsilon per round](epsilon.png)"]
    (out / "audit.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return out / "audit.md"


def _plot(result: AuditResult, path: Path) -> bool:
    """Recomputed cumulative epsilon (site's accountant) against the dataset's round, budget dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for s in result.sites:
        for d in s.datasets:
            xs = range(1, len(d.records) + 1)
            ys = [c.recomputed_epsilon if c.recomputed_epsilon is not None else float("nan") for c in d.records]
            label = s.site if len(s.datasets) == 1 else f"{s.site} {d.dataset_fingerprint[:8]}"
            (curve,) = ax.plot(xs, ys, "o-", label=label)
            ax.axhline(d.target_epsilon, color=curve.get_color(), linestyle="--", linewidth=0.8)
            drawn = True
    if drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training round in the dataset's history (ledger record, all runs)")
        ax.set_ylabel("recomputed cumulative epsilon")
        ax.set_title("Spent epsilon per site (dashed: budget)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn
