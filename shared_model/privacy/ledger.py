"""The site privacy ledger: an append-only, hash-chained JSON Lines file on the site's own disk.

One record per DP-SGD training round at the site. The ledger, not the training process and not
Flower's Context.state, is the source of truth: a site's spent epsilon is recomputed from every
record with the same `dataset_fingerprint`, across rounds, runs and restarts (see accounting.py
for the privacy unit, mechanism and accountants).

Record fields: format, run_id, server_round, dataset_fingerprint, sample_rate, noise_multiplier,
steps, max_grad_norm, target_epsilon and target_delta (the site's lifetime budget when the record
was written), accountant, epsilon (cumulative for that dataset after this record, as the site
computed it), time (UTC ISO 8601), prev_hash, hash. `hash` is the SHA-256 of
the record's canonical JSON without `hash`; `prev_hash` is the previous record's hash (64 zeros for
the first), so an edited, removed, reordered or truncated-then-extended ledger fails `verify`.

Writes are atomic: the whole file is rewritten to a temporary file, fsynced and renamed over the
ledger (then the folder is fsynced), under an exclusive lock. A crash leaves either the old or the
new ledger, never a torn record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from shared_model.util import utc_now

from .accounting import ACCOUNTANTS, DPSGDEvent, compute_epsilon

FORMAT = "fedcap-ledger/1"
GENESIS = "0" * 64
FIELDS = ("format", "run_id", "server_round", "dataset_fingerprint", "sample_rate", "noise_multiplier", "steps",
          "max_grad_norm", "target_epsilon", "target_delta", "accountant", "epsilon", "time", "prev_hash", "hash")


class LedgerError(ValueError):
    """The ledger file is malformed or its hash chain is broken."""


class BudgetExhaustedError(RuntimeError):
    """Training would take the dataset past its privacy budget."""

    def __init__(self, *, spent: float, projected: float, target_epsilon: float, target_delta: float) -> None:
        self.spent, self.projected, self.target_epsilon, self.target_delta = spent, projected, target_epsilon, target_delta
        super().__init__(f"privacy budget exhausted: epsilon spent {spent:.4f}, after this round {projected:.4f} "
                         f"> target_epsilon {target_epsilon} (delta {target_delta:g})")


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_event(record: dict[str, Any]) -> DPSGDEvent:
    return DPSGDEvent(sample_rate=record["sample_rate"], noise_multiplier=record["noise_multiplier"],
                      steps=record["steps"])


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise LedgerError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [f for f in FIELDS if f not in record]
    if missing:
        raise LedgerError(f"{where}: missing fields {missing}")
    if record["format"] != FORMAT:
        raise LedgerError(f"{where}: format must be {FORMAT!r}, got {record['format']!r}")
    if record["accountant"] not in ACCOUNTANTS:
        raise LedgerError(f"{where}: unknown accountant {record['accountant']!r}")
    try:
        record_event(record)
    except (ValueError, TypeError) as e:
        raise LedgerError(f"{where}: {e}") from None


class PrivacyLedger:
    """A site's ledger file. `path` need not exist yet."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """Every record, verified (format, fields and hash chain); [] for a missing file."""
        if not self.path.exists():
            return []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise LedgerError(f"ledger {self.path} is not UTF-8: {e}") from None
        records, prev = [], GENESIS
        for n, line in enumerate(lines, 1):
            where = f"ledger {self.path} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LedgerError(f"{where}: not valid JSON ({e})") from None
            _check_record(record, where)
            if record["prev_hash"] != prev:
                raise LedgerError(f"{where}: prev_hash does not match the previous record "
                                  f"(a record was removed, reordered or inserted)")
            if record_hash(record) != record["hash"]:
                raise LedgerError(f"{where}: hash mismatch (the record was edited)")
            records.append(record)
            prev = record["hash"]
        return records

    def events(self, dataset_fingerprint: str) -> list[DPSGDEvent]:
        return [record_event(r) for r in self.records() if r["dataset_fingerprint"] == dataset_fingerprint]

    def spent_epsilon(self, dataset_fingerprint: str, *, target_delta: float, accountant: str = "prv") -> float:
        """Epsilon of every recorded training on this dataset, recomputed (recorded epsilons are not trusted)."""
        return compute_epsilon(self.events(dataset_fingerprint), target_delta=target_delta, accountant=accountant)

    def check_budget(self, dataset_fingerprint: str, planned: DPSGDEvent, *, target_epsilon: float,
                     target_delta: float, accountant: str = "prv") -> float:
        """Epsilon after `planned` on top of the history; BudgetExhaustedError if above target_epsilon."""
        history = self.events(dataset_fingerprint)
        projected = compute_epsilon([*history, planned], target_delta=target_delta, accountant=accountant)
        if projected > target_epsilon:
            spent = compute_epsilon(history, target_delta=target_delta, accountant=accountant)
            raise BudgetExhaustedError(spent=spent, projected=projected, target_epsilon=target_epsilon,
                                       target_delta=target_delta)
        return projected

    def append(self, *, run_id: str, server_round: int, dataset_fingerprint: str, event: DPSGDEvent,
               max_grad_norm: float, target_epsilon: float, target_delta: float, accountant: str = "prv"
               ) -> dict[str, Any]:
        """Add one round's record, with the cumulative epsilon over the dataset's whole history."""
        with self._locked():
            records = self.records()
            history = [record_event(r) for r in records if r["dataset_fingerprint"] == dataset_fingerprint]
            record = {
                "format": FORMAT, "run_id": str(run_id), "server_round": int(server_round),
                "dataset_fingerprint": dataset_fingerprint, "sample_rate": float(event.sample_rate),
                "noise_multiplier": float(event.noise_multiplier), "steps": int(event.steps),
                "max_grad_norm": float(max_grad_norm), "target_epsilon": float(target_epsilon),
                "target_delta": float(target_delta), "accountant": accountant,
                "epsilon": compute_epsilon([*history, event], target_delta=target_delta, accountant=accountant),
                "time": utc_now(),
                "prev_hash": records[-1]["hash"] if records else GENESIS,
            }
            record["hash"] = record_hash(record)
            self._write([*records, record])
        return record

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, records: list[dict[str, Any]]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
