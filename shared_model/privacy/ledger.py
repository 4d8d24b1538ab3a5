"""The site privacy ledger: an append-only, hash-chained JSON Lines file on the site's own disk.

The ledger, not the training process and not Flower's Context.state, is the source of truth for
what a site has spent. Privacy unit: one record (an image with its captions), add/remove
neighbours. Each "dp-sgd" line is one round's mechanism (`steps` Poisson-sampled Gaussian steps at
`sample_rate` and `noise_multiplier`) together with the exact set of records it sampled from (the
`membership` version, stored in membership/ beside the ledger and hashed into the line, so the
chain covers it: membership.py). A record's epsilon composes every event whose membership holds it,
across rounds, runs, restarts and whatever else was added or removed meanwhile (individual.py).
Each "grant" line opens a run: the per-run allowance the site granted and the noise multiplier it
calibrated to that allowance over the run plan (site_budget.py); it is preceded by the run's
"count-gaussian" line: the Gaussian release (sensitivity 1) of how many records the site holds,
from which, and not from the exact count, the run's sample rate, steps and reported num-examples
are computed (site_budget.py). Each "vocab-gaussian" line is one
private vocabulary release (vocab_release.py): a Gaussian mechanism over the word counts of the
records in its membership (noise_multiplier x sqrt(max_words_per_record)), thresholded at the site
with `threshold_delta`; in a record's history it is one more event (accounting.gaussian_event).

Writes happen in one transaction per round (`PrivacyLedger.transaction`): lock, read and verify
once, plan, train, append exactly what was checked, unlock. A write goes to a temporary file that is
fsynced and renamed over the ledger (then the folder is fsynced), and, with a mirror folder, the
same bytes and membership files are written there before the lock is released.

The line format and hash chain: ledger_lines.py; history replay: history.py.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from shared_model.privacy.accounting import DPSGDEvent
from shared_model.privacy.history import build_histories
from shared_model.privacy.individual import RecordHistories
from shared_model.privacy.ledger_lines import (EVENT_KINDS, FORMAT, GENESIS, LedgerError, LedgerRollbackError,
                                               check_line, ledger_head, record_event, record_extra_delta,
                                               record_hash)
from shared_model.privacy.membership import MembershipStore
from shared_model.util import atomic_write, utc_now


class PrivacyLedger:
    """A site's ledger file (`path` need not exist yet), its membership/ folder, and an optional mirror."""

    def __init__(self, path: str | Path, *, mirror_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        self.membership = MembershipStore(self.path.parent / "membership")
        self.mirror_dir = Path(mirror_dir) if mirror_dir else None

    def records(self) -> list[dict[str, Any]]:
        """Every line, verified (format, fields, hash chain); [] for a new ledger. A ledger that is
        missing while its membership files or its mirror exist is an error, not a new ledger."""
        if not self.path.exists():
            self._check_really_new()
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
            check_line(record, where)
            if record["prev_hash"] != prev:
                raise LedgerError(f"{where}: prev_hash does not match the previous line "
                                  f"(a line was removed, reordered or inserted)")
            if record_hash(record) != record["hash"]:
                raise LedgerError(f"{where}: hash mismatch (the line was edited)")
            records.append(record)
            prev = record["hash"]
        return records

    def _check_really_new(self) -> None:
        mirrored = self.mirror_dir is not None and (self.mirror_dir / self.path.name).exists()
        if mirrored or any(self.membership.folder.glob("*.json")):
            where = f"; a mirrored copy is in {self.mirror_dir}: restore it with " \
                    f"`cp -a {self.mirror_dir}/. {self.path.parent}/`" if mirrored else ""
            raise LedgerRollbackError(f"ledger {self.path} is missing but this site has trained before "
                                      f"(membership files{' and a mirror' if mirrored else ''} exist){where}")

    @contextmanager
    def transaction(self) -> Iterator["LedgerTransaction"]:
        """Lock the ledger for one round: read and verify once, then append under the same lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield LedgerTransaction(self, self.records())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, records: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode("utf-8")
        atomic_write(self.path, data)
        if self.mirror_dir is not None:
            (self.mirror_dir / "membership").mkdir(parents=True, exist_ok=True)
            for f in self.membership.folder.glob("*.json"):
                target = self.mirror_dir / "membership" / f.name
                if not target.exists():
                    shutil.copyfile(f, target)
            identities = self.path.parent / "identities.json"  # privacy/identity.py: which row is which record
            if identities.exists():
                atomic_write(self.mirror_dir / identities.name, identities.read_bytes())
            atomic_write(self.mirror_dir / self.path.name, data)


class LedgerTransaction:
    """The verified lines of a locked ledger; `append` writes one more line (atomically)."""

    def __init__(self, ledger: PrivacyLedger, records: list[dict[str, Any]]) -> None:
        self.ledger, self.records = ledger, records
        self._histories: RecordHistories | None = None

    @property
    def head(self) -> tuple[str, int]:
        return ledger_head(self.records)

    def histories(self) -> RecordHistories:
        if self._histories is None:
            self._histories, _ = build_histories(self.records, self.ledger.membership)
        return self._histories

    def last_membership(self) -> str | None:
        return next((r["membership"] for r in reversed(self.records) if r["kind"] in EVENT_KINDS), None)

    def run_events(self, run_id: str) -> list[DPSGDEvent]:
        """Every mechanism run `run_id` has run so far (vocabulary releases, its count, its rounds):
        what the run's allowance pays for, composed as for a record that took part in all of them."""
        return [record_event(r) for r in self.records if r["kind"] in EVENT_KINDS and r["run_id"] == str(run_id)]

    def run_extra_delta(self, run_id: str) -> float:
        return sum(record_extra_delta(r) for r in self.records if r["kind"] in EVENT_KINDS
                   and r["run_id"] == str(run_id))

    def all_events(self) -> tuple[list[DPSGDEvent], float]:
        """Every mechanism this ledger records and their extra deltas summed: the history of a record
        that took part in all of them, an upper bound on every record's (a function of the
        mechanisms alone, each of which the server saw through its replies)."""
        lines = [r for r in self.records if r["kind"] in EVENT_KINDS]
        return [record_event(r) for r in lines], sum(record_extra_delta(r) for r in lines)

    def events_before(self, run_id: str) -> tuple[list[DPSGDEvent], float]:
        """`all_events` less run `run_id`'s own: the history a run's grant is calibrated against."""
        lines = [r for r in self.records if r["kind"] in EVENT_KINDS and r["run_id"] != str(run_id)]
        return [record_event(r) for r in lines], sum(record_extra_delta(r) for r in lines)

    def trained_rounds(self, run_id: str) -> list[int]:
        """The server rounds of run `run_id` that this site trained (dp-sgd lines)."""
        return [int(r["server_round"]) for r in self.records if r["kind"] == "dp-sgd" and r["run_id"] == str(run_id)]

    def grant(self, run_id: str) -> dict[str, Any] | None:
        return next((r for r in self.records if r["kind"] == "grant" and r["run_id"] == str(run_id)), None)

    def append_round(self, *, run_id: str, server_round: int, event: DPSGDEvent, members: list[str], retired: int,
                     max_grad_norm: float, target_epsilon: float, target_delta: float, accountant: str,
                     epsilon: float, init_checkpoint: str = "") -> dict[str, Any]:
        """One DP-SGD round: store its membership (a delta against the last one) and append the line.
        `epsilon` is the largest cumulative epsilon among `members` after the round, as checked."""
        return self._append_event("dp-sgd", run_id, members, {
            "server_round": int(server_round), "records_trained": len(set(members)),
            "records_retired": int(retired), "sample_rate": float(event.sample_rate),
            "noise_multiplier": float(event.noise_multiplier), "steps": int(event.steps),
            "max_grad_norm": float(max_grad_norm), "target_epsilon": float(target_epsilon),
            "target_delta": float(target_delta), "accountant": accountant, "epsilon": float(epsilon),
            "init_checkpoint": str(init_checkpoint)})

    def append_vocab_release(self, *, run_id: str, members: list[str], retired: int, noise_multiplier: float,
                             max_words_per_record: int, threshold: float, threshold_delta: float,
                             words_released: int, target_epsilon: float, target_delta: float, accountant: str,
                             epsilon: float) -> dict[str, Any]:
        """One private vocabulary release over the word counts of `members` (vocab_release.py).
        `epsilon` is the largest cumulative epsilon among `members` after it, as checked."""
        return self._append_event("vocab-gaussian", run_id, members, {
            "records_counted": len(set(members)), "records_retired": int(retired), "noise_multiplier": float(noise_multiplier),
            "max_words_per_record": int(max_words_per_record), "threshold": float(threshold),
            "threshold_delta": float(threshold_delta), "words_released": int(words_released),
            "target_epsilon": float(target_epsilon), "target_delta": float(target_delta), "accountant": accountant,
            "epsilon": float(epsilon)})

    def append_count(self, *, run_id: str, members: list[str], noise_multiplier: float, noisy_count: float,
                     target_epsilon: float, target_delta: float, accountant: str, epsilon: float) -> dict[str, Any]:
        """The run's count release: |members| + N(0, noise_multiplier^2), over `members`."""
        return self._append_event("count-gaussian", run_id, members, {
            "records_counted": len(set(members)), "noise_multiplier": float(noise_multiplier), "noisy_count": float(noisy_count),
            "target_epsilon": float(target_epsilon), "target_delta": float(target_delta), "accountant": accountant,
            "epsilon": float(epsilon)})

    def _append_event(self, kind: str, run_id: str, members: list[str], fields: dict[str, Any]) -> dict[str, Any]:
        """An event line over `members`: their set stored (a delta against the last one) and cited."""
        store = self.ledger.membership
        version = store.put(members, base=self.last_membership())
        return self.append({"kind": kind, "run_id": str(run_id), "membership": version,
                            "membership_sha256": store.file_sha256(version), **fields})

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        record = {"format": FORMAT, **fields, "time": utc_now(), "prev_hash": self.head[0]}
        record["hash"] = record_hash(record)
        check_line(record, f"new line for {self.ledger.path}")
        self.ledger._write([*self.records, record])
        self.records = [*self.records, record]
        if self._histories is not None and record["kind"] in EVENT_KINDS:
            self._histories.add(record_event(record), record["membership"],
                                self.ledger.membership.load(record["membership"]),
                                extra_delta=record_extra_delta(record))
        return record

