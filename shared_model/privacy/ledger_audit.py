"""Privacy-budget audit of site ledgers: what each dataset has spent, recomputed, never trusted.

Privacy unit and mechanism are those of accounting.py: one record (an image with its captions) of
one site's dataset, add/remove neighbours; each ledger record is `steps` Poisson-sampled Gaussian
DP-SGD steps, and a dataset's privacy loss composes every record with its `dataset_fingerprint`.

For each site ledger and each dataset in it the audit
- verifies the file (format, fields, hash chain: `PrivacyLedger.records`) and the budget fields;
- recomputes the spent epsilon at the dataset's `target_delta` with every requested accountant
  (accounting.compute_epsilon; the recorded epsilon is only compared, never used);
- recomputes the cumulative epsilon after every record with that record's own accountant and
  delta, and flags a record whose recorded epsilon is lower (under-reporting);
- compares accountants: prv and pld are both tight, so they must agree within `tolerance`
  (relative); rdp and dp-rdp are upper bounds, flagged only when below a tight one by more than it.

Severities: "error" (the ledger cannot be audited: unreadable, malformed, hash chain broken),
"failure" (budget exceeded, an under-reported record, an epsilon that cannot be recomputed with
the site's own accountant), "warning" (accountants disagree, budget fields change within one
dataset, another accountant fails). A broken ledger is an error for its site only; the others
are still audited. Budget and per-record comparisons allow `record_tolerance` (relative): the
same accountant on the same events reproduces the site's number, so only numerical noise is allowed.

The hash chain is not signed: it catches edits, removals and reorderings, not a ledger rewritten
from scratch. Compare `last_hash` with a copy kept elsewhere to detect that.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from .accounting import ACCOUNTANTS, DPSGDEvent, compute_epsilon
from .ledger import LedgerError, PrivacyLedger, record_event

DEFAULT_ACCOUNTANTS = ("prv", "rdp", "pld")
TIGHT = ("prv", "pld")
UPPER_BOUNDS = ("rdp", "dp-rdp")
TOLERANCE = 0.02         # relative, between accountants
RECORD_TOLERANCE = 1e-4  # relative, the same accountant on the same events (numerical noise only)
SEVERITIES = ("warning", "failure", "error")  # increasing


@dataclass(frozen=True)
class Finding:
    severity: str  # one of SEVERITIES
    kind: str      # malformed-ledger, budget-exceeded, under-reported, unverifiable, accountant-disagreement,
                   # accountant-failed, inconsistent-budget
    site: str
    message: str
    dataset_fingerprint: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class RecordCheck:
    line: int
    run_id: str
    server_round: int
    accountant: str
    target_delta: float
    recorded_epsilon: float
    recomputed_epsilon: float | None  # cumulative after this record; None if the accountant failed


@dataclass
class DatasetAudit:
    dataset_fingerprint: str
    rounds: int
    run_ids: list[str]
    accountant: str                    # the site's (latest record's)
    target_epsilon: float              # budget, latest record
    target_delta: float                # latest record
    epsilon: dict[str, float | None]   # requested accountant -> recomputed spent epsilon
    spent_epsilon: float | None        # recomputed with the site's accountant
    remaining: float | None
    records: list[RecordCheck]
    status: str = "ok"                 # ok or the worst severity of its findings


@dataclass
class SiteAudit:
    site: str
    path: str
    datasets: list[DatasetAudit] = field(default_factory=list)
    last_hash: str | None = None
    error: str | None = None


@dataclass
class AuditResult:
    sites: list[SiteAudit]
    findings: list[Finding]
    accountants: tuple[str, ...]
    tolerance: float
    record_tolerance: float

    @property
    def status(self) -> str:
        return _worst(f.severity for f in self.findings)

    def exit_code(self, *, strict: bool = False) -> int:
        """0 all good; 1 a failure (or, with strict, a warning); 2 a ledger that cannot be audited."""
        return {"ok": 0, "warning": int(strict), "failure": 1, "error": 2}[self.status]


def find_ledgers(paths: Sequence[str | Path]) -> list[tuple[str, Path]]:
    """(site name, ledger file) for each path: a ledger file; a folder holding ledger.jsonl; a run
    folder with sites/*/ledger.jsonl; a folder with */ledger.jsonl. The site name is the folder
    holding the ledger (its full path where two would share a name)."""
    if not paths:
        raise ValueError("no path given")
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {p}")
        if p.is_file():
            found.append(p)
        elif (p / "ledger.jsonl").is_file():
            found.append(p / "ledger.jsonl")
        else:
            ledgers = sorted(p.glob("sites/*/ledger.jsonl"), key=_natural) or sorted(p.glob("*/ledger.jsonl"),
                                                                                         key=_natural)
            if not ledgers:
                raise FileNotFoundError(f"no ledger found under {p} (looked for ledger.jsonl, "
                                        f"sites/*/ledger.jsonl and */ledger.jsonl)")
            found += ledgers
    found = list(dict.fromkeys(f.resolve() for f in found))  # absolute, each file once
    names = [f.parent.name for f in found]
    return [(n if names.count(n) == 1 else str(f.parent), f) for n, f in zip(names, found)]


def audit(paths: Sequence[str | Path], *, accountants: Sequence[str] = DEFAULT_ACCOUNTANTS,
          tolerance: float = TOLERANCE, record_tolerance: float = RECORD_TOLERANCE) -> AuditResult:
    """Audit every ledger found under `paths` (see find_ledgers)."""
    accountants = tuple(accountants)
    bad = [a for a in accountants if a not in ACCOUNTANTS]
    if not accountants or bad:
        raise ValueError(f"accountants must be among {ACCOUNTANTS}, got {list(accountants)}")
    for name, value in (("tolerance", tolerance), ("record_tolerance", record_tolerance)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    sites, findings = [], []
    for site, path in find_ledgers(paths):
        result, found = audit_ledger(site, path, accountants=accountants, tolerance=tolerance,
                                     record_tolerance=record_tolerance)
        sites.append(result)
        findings += found
    return AuditResult(sites, findings, accountants, float(tolerance), float(record_tolerance))


def audit_ledger(site: str, path: Path, *, accountants: Sequence[str], tolerance: float,
                 record_tolerance: float) -> tuple[SiteAudit, list[Finding]]:
    try:
        records = PrivacyLedger(path).records()
        for n, r in enumerate(records, 1):
            _check_budget_fields(r, f"ledger {path} line {n}")
    except (LedgerError, OSError) as e:
        return SiteAudit(site, str(path), error=str(e)), [Finding("error", "malformed-ledger", site, str(e))]
    by_dataset: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for n, r in enumerate(records, 1):
        by_dataset.setdefault(r["dataset_fingerprint"], []).append((n, r))
    out = SiteAudit(site, str(path), last_hash=records[-1]["hash"] if records else None)
    findings: list[Finding] = []
    for fingerprint, rows in by_dataset.items():
        dataset, found = _audit_dataset(site, fingerprint, rows, accountants, tolerance, record_tolerance)
        out.datasets.append(dataset)
        findings += found
    return out, findings


def _audit_dataset(site: str, fingerprint: str, rows: list[tuple[int, dict[str, Any]]],
                   accountants: Sequence[str], tolerance: float, rtol: float) -> tuple[DatasetAudit, list[Finding]]:
    findings: list[Finding] = []

    def flag(severity: str, kind: str, message: str, line: int | None = None) -> None:
        findings.append(Finding(severity, kind, site, message, fingerprint, line))

    latest = rows[-1][1]
    site_accountant, budget, delta = latest["accountant"], latest["target_epsilon"], latest["target_delta"]
    events = tuple(record_event(r) for _, r in rows)

    checks = []
    for i, (line, r) in enumerate(rows):
        recomputed, err = _try_epsilon(events[: i + 1], r["target_delta"], r["accountant"])
        checks.append(RecordCheck(line, r["run_id"], r["server_round"], r["accountant"], r["target_delta"],
                                  r["epsilon"], recomputed))
        if err:
            flag("failure", "unverifiable", f"line {line}: cannot recompute epsilon with the site's accountant "
                                            f"{r['accountant']!r}: {err}", line)
        elif r["epsilon"] < recomputed * (1 - rtol) - 1e-12:
            flag("failure", "under-reported", f"line {line}: recorded epsilon {r['epsilon']:.6g} < recomputed "
                                              f"{recomputed:.6g} ({r['accountant']}, delta {r['target_delta']:g})",
                 line)

    spent = checks[-1].recomputed_epsilon  # the site's accountant at the dataset's delta, whole history
    if spent is not None and spent > budget * (1 + rtol):
        flag("failure", "budget-exceeded", f"epsilon spent {spent:.6g} ({site_accountant}, delta {delta:g}) "
                                           f"> target_epsilon {budget:g}")

    epsilon: dict[str, float | None] = {}
    for a in accountants:
        epsilon[a], err = _try_epsilon(events, delta, a)
        if err:
            flag("warning", "accountant-failed", f"accountant {a!r} failed: {err}")
    for message in _disagreements(epsilon, tolerance):
        flag("warning", "accountant-disagreement", message)

    for key in ("target_delta", "target_epsilon"):
        values = {r[key] for _, r in rows}
        if len(values) > 1:
            per_line = ", ".join(f"line {n}: {r[key]:g}" for n, r in rows)
            flag("warning", "inconsistent-budget", f"{key} changes within the dataset's records ({per_line})")

    dataset = DatasetAudit(
        dataset_fingerprint=fingerprint, rounds=len(rows), run_ids=list(dict.fromkeys(r["run_id"] for _, r in rows)),
        accountant=site_accountant, target_epsilon=budget, target_delta=delta, epsilon=epsilon, spent_epsilon=spent,
        remaining=None if spent is None else budget - spent, records=checks,
        status=_worst(f.severity for f in findings))
    return dataset, findings


def _disagreements(epsilon: dict[str, float | None], tolerance: float) -> list[str]:
    tight = {a: epsilon[a] for a in TIGHT if epsilon.get(a) is not None}
    messages = []
    if len(tight) == 2:
        lo, hi = sorted(tight.values())
        if hi - lo > tolerance * lo:
            messages.append(f"prv {tight['prv']:.6g} and pld {tight['pld']:.6g} differ by more than "
                            f"{tolerance:g} (relative)")
    for bound in UPPER_BOUNDS:
        value = epsilon.get(bound)
        for a, tight_value in tight.items():
            if value is not None and value < tight_value * (1 - tolerance):
                messages.append(f"{bound} {value:.6g} is an upper bound but lies below {a} {tight_value:.6g} "
                                f"by more than {tolerance:g} (relative)")
    return messages


def _check_budget_fields(record: dict[str, Any], where: str) -> None:
    """What PrivacyLedger.records does not check: the numbers the audit compares against."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)

    if not (number(record["target_delta"]) and 0 < record["target_delta"] < 1):
        raise LedgerError(f"{where}: target_delta must be in (0, 1), got {record['target_delta']!r}")
    if not (number(record["target_epsilon"]) and record["target_epsilon"] > 0):
        raise LedgerError(f"{where}: target_epsilon must be a number > 0, got {record['target_epsilon']!r}")
    if not (number(record["epsilon"]) and record["epsilon"] >= 0):
        raise LedgerError(f"{where}: epsilon must be a number >= 0, got {record['epsilon']!r}")
    if not isinstance(record["dataset_fingerprint"], str) or not isinstance(record["run_id"], str):
        raise LedgerError(f"{where}: dataset_fingerprint and run_id must be strings")


def _try_epsilon(events: tuple[DPSGDEvent, ...], delta: float, accountant: str) -> tuple[float | None, str | None]:
    try:
        return _epsilon(events, delta, accountant), None
    except (ValueError, ArithmeticError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {e}"


@lru_cache(maxsize=512)
def _epsilon(events: tuple[DPSGDEvent, ...], delta: float, accountant: str) -> float:
    # compute_epsilon is a pure function of frozen events: the per-record checks and the dataset's
    # totals share prefixes, and sites of one federation often share mechanisms.
    return compute_epsilon(events, target_delta=delta, accountant=accountant)


def _worst(severities: Iterable[str]) -> str:
    ranks = [SEVERITIES.index(s) for s in severities]
    return SEVERITIES[max(ranks)] if ranks else "ok"


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]
