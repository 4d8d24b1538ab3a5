"""Migrating a `fedcap-ledger/1` ledger (spending keyed by a whole-dataset fingerprint) to the
per-record format, conservatively.

A v1 line does not say which records its dataset held. The migration therefore charges every v1
event to every record the site holds now: each current record is treated as if it had been in
every dataset the site ever trained on. That can only over-state a record's epsilon (a record that
was not there is charged anyway), never under-state it, so the migrated ledger is sound; records
added later start fresh. The v1 file is kept beside the new one as `ledger.v1.jsonl` and its hash
chain is verified before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from shared_model.privacy.accounting import OPACUS_ACCOUNTANTS, DPSGDEvent, compute_epsilon
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.ledger_lines import GENESIS, LedgerError, record_hash

V1 = "fedcap-ledger/1"


def read_v1(path: Path) -> list[dict]:
    records, prev = [], GENESIS
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise LedgerError(f"{path} line {n}: not valid JSON ({e})") from None
        if not isinstance(r, dict) or r.get("format") != V1:
            raise LedgerError(f"{path} line {n}: not a {V1} line")
        if r.get("prev_hash") != prev or record_hash(r) != r.get("hash"):
            raise LedgerError(f"{path} line {n}: the v1 hash chain is broken; refusing to migrate a tampered ledger")
        records.append(r)
        prev = r["hash"]
    return records


def migrate_v1(state_dir: str | Path, record_ids: Sequence[str]) -> tuple[Path, int]:
    """Rewrite STATE_DIR/ledger.jsonl (v1) in the current format, every v1 event charged to every
    record in `record_ids`. Returns (path, number of events migrated)."""
    state_dir = Path(state_dir)
    path, backup = state_dir / "ledger.jsonl", state_dir / "ledger.v1.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    if backup.exists():
        raise FileExistsError(f"{backup} exists: this ledger was migrated already")
    if not record_ids:
        raise ValueError("no records given: the site's current data is needed to charge the old events to")
    old = read_v1(path)
    os.replace(path, backup)
    ledger, members = PrivacyLedger(path), sorted(set(record_ids))
    history: list[DPSGDEvent] = []
    with ledger.transaction() as tx:
        for r in old:
            event = DPSGDEvent(sample_rate=r["sample_rate"], noise_multiplier=r["noise_multiplier"], steps=r["steps"])
            history.append(event)
            accountant = r["accountant"] if r["accountant"] in OPACUS_ACCOUNTANTS else "rdp"
            tx.append_round(run_id=f"{r['run_id']} (v1)", server_round=r["server_round"], event=event,
                            members=members, retired=0, max_grad_norm=r["max_grad_norm"],
                            target_epsilon=r["target_epsilon"], target_delta=r["target_delta"],
                            accountant=accountant,
                            epsilon=compute_epsilon(history, target_delta=r["target_delta"], accountant=accountant))
    return path, len(old)
