"""An audit's outputs: a terminal table, JSON (full precision) and a Markdown report with a plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from shared_model.util import json_safe

from shared_model.audit.ledger_audit import AuditResult

FORMAT = "fedcap-audit/2"
MECHANISM = ("Privacy unit: one record (an image with all its captions) at one site, add/remove neighbours. "
             "Mechanism: per dp-sgd ledger line, `steps` DP-SGD steps, each a Poisson-sampled Gaussian "
             "(SelfComposed(PoissonSampled(sample_rate, Gaussian(noise_multiplier)), steps)) over the records of "
             "the line's membership file; a record's epsilon composes every line whose membership holds it, across "
             "rounds, runs and dataset changes. A vocab-gaussian line (private vocabulary release) is one Gaussian "
             "mechanism (noise_multiplier x sqrt(max_words_per_record)) over the word counts of its membership's "
             "records, composed the same way; its threshold_delta adds to those records' delta. Epsilon columns "
             "give the largest per-record epsilon.")


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table_rows(result: AuditResult) -> tuple[list[str], list[list[str]]]:
    header = ["site", "rounds", "runs", "records", "retired", *(f"eps {a}" for a in result.accountants), "budget",
              "granted", "remaining", "status"]
    rows = []
    for s in result.sites:
        if s.error:
            rows.append([s.site, "-", "-", "-", "-", *("-" for _ in result.accountants), "-", "-", "-", "ERROR"])
            continue
        granted = f"{s.grants[-1].granted_epsilon:g}" if s.grants else "-"
        rows.append([s.site, str(s.rounds), str(len(s.run_ids)), str(s.records), str(s.records_retired),
                     *(_num(s.epsilon.get(a)) for a in result.accountants),
                     "-" if s.target_epsilon is None else f"{s.target_epsilon:g}", granted, _num(s.remaining),
                     s.status if s.status == "ok" else s.status.upper()])
    return header, rows


def _finding_lines(result: AuditResult) -> list[str]:
    return [f"{f.severity.upper()} [{f.kind}] {f.site}: {f.message}" for f in result.findings]


def _vocab_lines(result: AuditResult) -> list[str]:
    return [f"{s.site}: {s.vocab_releases} private vocabulary release(s), recomputed with the rounds; their "
            f"thresholding adds delta {s.threshold_delta:g} (a record's guarantee: delta {s.target_delta:g} + "
            f"{s.threshold_delta:g})" for s in result.sites if not s.error and s.vocab_releases]


def format_table(result: AuditResult) -> str:
    """Plain text: aligned columns, then every finding, then the overall status."""
    header, rows = table_rows(result)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {i for i, h in enumerate(header) if h not in ("site", "status")}

    def line(cells: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(cells).rstrip()

    out = [line(header), line(["-" * w for w in widths]), *map(line, rows), *_vocab_lines(result), ""]
    out += _finding_lines(result) or ["no findings"]
    out.append(f"status: {result.status} (eps: the largest per-record epsilon at the site's target_delta; remaining = "
               f"budget - that, with the site's accountant; retired: records left out of the last round; tolerance "
               f"{result.tolerance:g} between accountants)")
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
          *(["", *(f"- {v}" for v in _vocab_lines(result))] if _vocab_lines(result) else []), "", "## Findings", ""]
    md += [f"- {line}" for line in _finding_lines(result)] or ["None."]
    md += ["", "## What was recomputed", "", MECHANISM, "",
           f"Accountants: {', '.join(result.accountants)} (prv: Opacus PRV, tight; pld: dp_accounting PLD, tight; "
           f"rdp/dp-rdp: RDP, upper bounds), each at the site's target_delta. Recorded epsilons are compared, "
           f"never used. prv and pld must agree within {result.tolerance:g} (relative); lines and budgets are "
           f"compared with the site's own accountant within {result.record_tolerance:g} (relative)."]
    for s in result.sites:
        md += ["", f"## {s.site}", "", f"- ledger: `{s.path}`"]
        if s.error:
            md += ["", f"Not audited: {s.error}"]
            continue
        md += [f"- last hash: `{s.last_hash}` ({s.lines} lines; the server witnesses it every round)",
               f"- budget: epsilon {s.target_epsilon:g} per record at delta {s.target_delta:g}, site accountant "
               f"{s.accountant}; records ever trained: {s.records}; retired in the last round: {s.records_retired}"
               if s.target_epsilon is not None else "- no training recorded"]
        if s.grants:
            md += ["", "| run | requested epsilon | granted | noise multiplier | spent before |", "|---|---|---|---|---|"]
            md += [f"| {g.run_id} | {g.requested_epsilon:g} | {g.granted_epsilon:g} | {g.noise_multiplier:.4f} | "
                   f"{g.spent_before:.4f} |" for g in s.grants]
        if s.checks:
            md += ["", "| round | line | run | server round | trained | retired | recorded epsilon | recomputed |",
                   "|---|---|---|---|---|---|---|---|"]
            md += [f"| {i} | {c.line} | {c.run_id} | {c.server_round if c.kind == 'dp-sgd' else 'vocabulary'} | {c.records_trained} | {c.records_retired} | "
                   f"{c.recorded_epsilon:.6f} | {_num(c.recomputed_epsilon, 6)} |" for i, c in enumerate(s.checks, 1)]
    if _plot(result, out / "epsilon.png"):
        md += ["", "![Recomputed cumulative epsilon per round](epsilon.png)"]
    (out / "audit.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return out / "audit.md"


def _plot(result: AuditResult, path: Path) -> bool:
    """Recomputed largest per-record epsilon (site's accountant) per round, budget dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for s in result.sites:
        if not s.checks:
            continue
        xs = range(1, len(s.checks) + 1)
        ys = [c.recomputed_epsilon if c.recomputed_epsilon is not None else float("nan") for c in s.checks]
        (curve,) = ax.plot(xs, ys, "o-" if len(s.checks) < 60 else "-", label=s.site)
        ax.axhline(s.target_epsilon, color=curve.get_color(), linestyle="--", linewidth=0.8)
        drawn = True
    if drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("event in the site's history (dp-sgd or vocab-gaussian ledger line, all runs)")
        ax.set_ylabel("largest per-record epsilon, recomputed")
        ax.set_title("Spent epsilon per site (dashed: budget)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn
