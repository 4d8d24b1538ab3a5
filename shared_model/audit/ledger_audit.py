"""Privacy-budget audit of site ledgers: every record's epsilon, recomputed, never trusted.

Privacy unit and mechanism are those of accounting.py: one record (an image with its captions) at
one site, add/remove neighbours; each "dp-sgd" ledger line is `steps` Poisson-sampled Gaussian
steps over the records of its membership file, and a record's privacy loss composes every line
whose membership holds it (individual.py), across rounds, runs and dataset changes. A
"vocab-gaussian" line (a private vocabulary release, vocab_release.py) is one Gaussian mechanism
over the records of its membership and is replayed and checked like a dp-sgd line, and so is a
"count-gaussian" line (a run's noisy record count). Delta composes per record: a record's epsilon
is recomputed at target_delta minus the thresholding deltas of the releases it was counted in, and
a record whose thresholding deltas reach target_delta is a failure (`delta-exceeded`).
Every run is checked against its grant (`check_runs`): its rounds, the mechanism of each round,
the spend of all its mechanisms together, the grant's rate and steps against the run's noisy
count, and the target delta against the records counted (`mechanism-mismatch`); a recorded
epsilon far above the recomputed one is a failure too (`epsilon-mismatch`: the line's mechanism
was changed after it was checked).

For each site ledger the audit
- verifies the file (format, fields, hash chain) and every membership file it cites (each must
  rebuild to its content-addressed version and match the hash and count in the line);
- replays the lines in order, incrementally (records grouped by identical history, one accountant
  call per distinct history): after each dp-sgd line it recomputes the largest cumulative epsilon
  among that line's records with the line's own accountant and delta, and flags a line whose
  recorded epsilon is lower (under-reporting) or above the line's budget (budget exceeded);
- reports, with every requested accountant, the largest per-record epsilon at the end, the number
  of records ever trained and retired in the last round, and each run's grant (allowance);
- compares accountants: prv and pld are both tight, so they must agree within `tolerance`
  (relative); rdp and dp-rdp are upper bounds, flagged only when below a tight one by more than it.
With a federation state file (the server's witness of each site's ledger head), every witnessed
head must be found in one of the audited ledgers: a ledger that was deleted, rolled back or
rewritten is a failure.

Severities: "error" (a ledger cannot be audited), "failure" (budget exceeded, under-reported,
unverifiable, witnessed head missing), "warning" (accountants disagree, budget fields change, an
accountant fails). One broken ledger is an error for its site only; the others are still audited.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from shared_model.privacy.accounting import ACCOUNTANTS
from shared_model.privacy.individual import conversion_delta, max_signature_epsilon
from shared_model.privacy.federation_state import load_federation_state
from shared_model.privacy.history import build_histories
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.ledger_lines import EVENT_KINDS, LedgerError
from shared_model.audit.run_audit import check_runs

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
                   # accountant-failed, inconsistent-budget, witness-missing
    site: str
    message: str
    line: int | None = None


@dataclass(frozen=True)
class LineCheck:
    line: int
    run_id: str
    server_round: int
    accountant: str
    target_epsilon: float
    target_delta: float
    records_trained: int
    records_retired: int
    recorded_epsilon: float
    recomputed_epsilon: float | None  # largest cumulative epsilon among the line's records; None: failed
    kind: str = "dp-sgd"              # or "vocab-gaussian"


@dataclass(frozen=True)
class RunGrant:
    run_id: str
    requested_epsilon: float
    granted_epsilon: float
    noise_multiplier: float
    spent_before: float


@dataclass
class SiteAudit:
    site: str
    path: str
    error: str | None = None
    last_hash: str | None = None
    lines: int = 0
    rounds: int = 0
    run_ids: list[str] = field(default_factory=list)
    records: int = 0                        # distinct records ever trained
    records_retired: int = 0                # in the latest round
    accountant: str | None = None           # the site's (latest line)
    target_epsilon: float | None = None     # latest line
    target_delta: float | None = None
    epsilon: dict[str, float | None] = field(default_factory=dict)  # accountant -> largest per-record epsilon
    spent_epsilon: float | None = None      # the site's accountant
    remaining: float | None = None          # budget - spent (for the most-spent record)
    grants: list[RunGrant] = field(default_factory=list)
    vocab_releases: int = 0                 # vocab-gaussian lines
    threshold_delta: float = 0.0            # their thresholding deltas, summed: added to a record's delta at most
    checks: list[LineCheck] = field(default_factory=list)
    status: str = "ok"


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
    folder with sites/*/ledger.jsonl; a folder with */ledger.jsonl or */state/ledger.jsonl. The site
    name is the folder holding the ledger (its parent's name for a `state` folder), made unique."""
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
            ledgers = next((sorted(p.glob(g), key=_natural) for g in
                            ("sites/*/ledger.jsonl", "*/ledger.jsonl", "*/state/ledger.jsonl", "sites/*/state/ledger.jsonl")
                            if list(p.glob(g))), [])
            if not ledgers:
                raise FileNotFoundError(f"no ledger found under {p} (looked for ledger.jsonl, sites/*/ledger.jsonl, "
                                        f"*/ledger.jsonl and */state/ledger.jsonl)")
            found += ledgers
    found = list(dict.fromkeys(f.resolve() for f in found))  # absolute, each file once
    names = [f.parent.parent.name if f.parent.name == "state" else f.parent.name for f in found]
    return [(n if names.count(n) == 1 else str(f.parent), f) for n, f in zip(names, found)]


def audit(paths: Sequence[str | Path], *, accountants: Sequence[str] = DEFAULT_ACCOUNTANTS,
          tolerance: float = TOLERANCE, record_tolerance: float = RECORD_TOLERANCE,
          federation_state: str | Path | None = None, witness_sites: Sequence[str] | None = None,
          progress=None) -> AuditResult:
    """Audit every ledger found under `paths` (see find_ledgers), and with `federation_state` check
    every witnessed head, or only those of `witness_sites` (names as the server witnessed them: each
    site's node_config site-name), e.g. a site auditing its own ledger. `progress(done, total, site)`
    is called after each site."""
    accountants = tuple(accountants)
    if witness_sites and federation_state is None:
        raise ValueError("--site needs --federation-state")
    bad = [a for a in accountants if a not in ACCOUNTANTS]
    if not accountants or bad:
        raise ValueError(f"accountants must be among {ACCOUNTANTS}, got {list(accountants)}")
    for name, value in (("tolerance", tolerance), ("record_tolerance", record_tolerance)):
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    ledgers = find_ledgers(paths)
    sites, findings, hashes = [], [], {}
    for k, (site, path) in enumerate(ledgers, 1):
        result, found, chain = audit_ledger(site, path, accountants=accountants, tolerance=tolerance,
                                            record_tolerance=record_tolerance)
        sites.append(result)
        findings += found
        hashes[site] = chain
        if progress is not None:
            progress(k, len(ledgers), site)
    if federation_state is not None:
        findings += check_witnessed_heads(federation_state, hashes, only=witness_sites)
    return AuditResult(sites, findings, accountants, float(tolerance), float(record_tolerance))


def check_witnessed_heads(federation_state: str | Path, chains: dict[str, list[str]],
                          only: Sequence[str] | None = None) -> list[Finding]:
    """A failure for every witnessed (site, head, line count) that no audited ledger holds; with
    `only`, for those sites alone (a name the file does not hold is an error)."""
    path = Path(federation_state)
    try:
        if not path.is_file():
            raise ValueError(f"federation state {path} not found")
        witnessed = load_federation_state(path)
    except ValueError as e:
        return [Finding("error", "malformed-ledger", "(federation)", str(e))]
    if only:
        unknown = sorted(set(only) - set(witnessed))
        if unknown:
            return [Finding("error", "malformed-ledger", "(federation)",
                            f"{path} witnesses no site named {', '.join(unknown)} (it holds: "
                            f"{', '.join(sorted(witnessed)) or 'none'})")]
        witnessed = {site: w for site, w in witnessed.items() if site in set(only)}
    findings = []
    for site, w in sorted(witnessed.items()):
        count, head = int(w["lines"]), str(w["head"])
        if not any(len(chain) >= count and chain[count - 1] == head for chain in chains.values()):
            hint = "" if only or site in chains else (
                f"; if you meant to audit only {', '.join(sorted(chains)) or 'some sites'}, say so with "
                + " ".join(f"--site {name}" for name in sorted(chains)))
            findings.append(Finding("failure", "witness-missing", site,
                                    f"no audited ledger holds the head the server witnessed for {site} "
                                    f"({count} lines, hash {head[:16]}.., run {w.get('run_id')}): its ledger is "
                                    f"missing, was rolled back to an older copy, or was rewritten{hint}"))
    return findings


def audit_ledger(site: str, path: Path, *, accountants: Sequence[str], tolerance: float,
                 record_tolerance: float) -> tuple[SiteAudit, list[Finding], list[str]]:
    """(the site's audit, its findings, its ledger's hash chain)."""
    ledger = PrivacyLedger(path)
    try:
        records = ledger.records()
        histories, touched = build_histories(records, ledger.membership)
    except (LedgerError, OSError) as e:
        return SiteAudit(site, str(path), error=str(e)), [Finding("error", "malformed-ledger", site, str(e))], []
    findings: list[Finding] = []

    def flag(severity: str, kind: str, message: str, line: int | None = None) -> None:
        findings.append(Finding(severity, kind, site, message, line))

    out = SiteAudit(site, str(path), last_hash=records[-1]["hash"] if records else None, lines=len(records))
    rows = [(n, r, touched[n - 1]) for n, r in enumerate(records, 1) if r["kind"] in EVENT_KINDS]
    out.grants = [RunGrant(r["run_id"], r["requested_epsilon"], r["granted_epsilon"], r["noise_multiplier"],
                           r["spent_before"]) for r in records if r["kind"] == "grant"]
    prefixes: dict[int, list] = {}  # group -> its signature after each event of its history
    deltas: dict[int, list] = {}    # group -> its thresholding deltas summed after each event
    for k, (n, r, groups) in enumerate(rows):  # the k-th event line is event k of the histories
        by_delta: dict[float, list] = {}
        for g in groups:  # a group made by a later split inherits the history before it
            if g not in prefixes:
                prefixes[g] = histories.prefix_signatures(g)
                acc, deltas[g] = 0.0, []
                for i in histories.history[g]:
                    acc += histories.extra_delta[i]
                    deltas[g].append(acc)
            j = bisect_left(histories.history[g], k)
            by_delta.setdefault(deltas[g][j], []).append(prefixes[g][j])
        spent_delta = max(by_delta, default=0.0)
        if conversion_delta(r["target_delta"], spent_delta) is None:
            flag("failure", "delta-exceeded", f"line {n}: a record's thresholding deltas sum to {spent_delta:.3g}, "
                                              f"not below target_delta {r['target_delta']:g}: its total delta "
                                              f"(accounting + thresholding) passes the budget", n)
        recomputed, err = _try(lambda: max(
            (max_signature_epsilon(sigs, target_delta=conversion_delta(r["target_delta"], d) or r["target_delta"],
                                   accountant=r["accountant"]) for d, sigs in by_delta.items()), default=0.0))
        kind = r["kind"]
        out.checks.append(LineCheck(n, r["run_id"], r["server_round"] if kind == "dp-sgd" else 0, r["accountant"],
                                    r["target_epsilon"], r["target_delta"],
                                    r["records_trained"] if kind == "dp-sgd" else r["records_counted"],
                                    r.get("records_retired", 0), r["epsilon"], recomputed, kind))
        if err:
            flag("failure", "unverifiable", f"line {n}: cannot recompute epsilon with the site's accountant "
                                            f"{r['accountant']!r}: {err}", n)
            continue
        if r["epsilon"] < recomputed * (1 - record_tolerance) - 1e-12:
            flag("failure", "under-reported", f"line {n}: recorded epsilon {r['epsilon']:.6g} < recomputed "
                                              f"{recomputed:.6g} ({r['accountant']}, delta {r['target_delta']:g})", n)
        if r["epsilon"] > recomputed * 1.05 + 1e-9:  # honest lines hold what the site checked
            flag("failure", "epsilon-mismatch", f"line {n}: recorded epsilon {r['epsilon']:.6g} is far above the "
                                                f"recomputed {recomputed:.6g}: the line's mechanism is not the one "
                                                f"its epsilon was checked for", n)
        if recomputed > r["target_epsilon"] * (1 + record_tolerance):
            flag("failure", "budget-exceeded", f"line {n}: a record reached epsilon {recomputed:.6g} "
                                               f"({r['accountant']}, delta {r['target_delta']:g}) > target_epsilon "
                                               f"{r['target_epsilon']:g}", n)
    for severity, message, n in check_runs(records):
        flag(severity, "mechanism-mismatch", message, n)
    vocab_lines = [r for _, r, _ in rows if r["kind"] == "vocab-gaussian"]
    out.vocab_releases, out.threshold_delta = len(vocab_lines), sum(r["threshold_delta"] for r in vocab_lines)
    if rows:
        latest = rows[-1][1]
        out.rounds = sum(r["kind"] == "dp-sgd" for _, r, _ in rows)
        out.run_ids = list(dict.fromkeys(r["run_id"] for _, r, _ in rows))
        last_round = next((r for _, r, _ in reversed(rows) if r["kind"] == "dp-sgd"), {})
        out.records, out.records_retired = len(histories.group_of), int(last_round.get("records_retired", 0))
        out.accountant, out.target_epsilon, out.target_delta = (latest["accountant"], latest["target_epsilon"],
                                                                latest["target_delta"])
        live = histories.live_groups()
        for a in dict.fromkeys([*accountants, out.accountant]):
            value, err = _try(lambda: histories.max_epsilon(live, target_delta=out.target_delta, accountant=a))
            if a in accountants:
                out.epsilon[a] = value
                if err:
                    flag("warning", "accountant-failed", f"accountant {a!r} failed: {err}")
            if a == out.accountant and not err:
                out.spent_epsilon = value
                out.remaining = out.target_epsilon - value
        for message in _disagreements(out.epsilon, tolerance):
            flag("warning", "accountant-disagreement", message)
        for key in ("target_delta", "target_epsilon", "accountant"):
            values = list(dict.fromkeys(r[key] for _, r, _ in rows))
            if len(values) > 1:
                flag("warning", "inconsistent-budget", f"{key} changes across the ledger's lines ({values}); each "
                                                        f"line is checked against its own")
    out.status = _worst(f.severity for f in findings)
    return out, findings, [r["hash"] for r in records]


def _try(fn) -> tuple[float | None, str | None]:
    try:
        return fn(), None
    except (ValueError, ArithmeticError, RuntimeError) as e:
        return None, f"{type(e).__name__}: {e}"


def _disagreements(epsilon: dict[str, float | None], tolerance: float) -> list[str]:
    tight = {a: epsilon[a] for a in TIGHT if epsilon.get(a) is not None}
    messages = []
    if len(tight) == 2:
        lo, hi = sorted(tight.values())
        if hi - lo > tolerance * max(lo, 1e-12):
            messages.append(f"prv {tight['prv']:.6g} and pld {tight['pld']:.6g} differ by more than "
                            f"{tolerance:g} (relative)")
    for bound in UPPER_BOUNDS:
        value = epsilon.get(bound)
        for a, tight_value in tight.items():
            if value is not None and value < tight_value * (1 - tolerance):
                messages.append(f"{bound} {value:.6g} is an upper bound but lies below {a} {tight_value:.6g} "
                                f"by more than {tolerance:g} (relative)")
    return messages


def _worst(severities: Iterable[str]) -> str:
    ranks = [SEVERITIES.index(s) for s in severities]
    return SEVERITIES[max(ranks)] if ranks else "ok"


def _natural(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]
