"""Replaying a ledger's history: every event line's mechanism applied to the records of its
membership, giving each record's history (individual.RecordHistories) after the whole ledger."""

from __future__ import annotations

from typing import Any

from shared_model.privacy.individual import RecordHistories
from shared_model.privacy.ledger_lines import EVENT_KINDS, LedgerError, record_event, record_extra_delta
from shared_model.privacy.membership import MembershipError, MembershipStore


def build_histories(records: list[dict[str, Any]], store: MembershipStore,
                    ) -> tuple[RecordHistories, list[list[int]]]:
    """Replay every event line (dp-sgd, vocab-gaussian): the record histories after the whole
    ledger, and for each line the groups that took part in it ([] for grants). Membership files are
    verified on the way."""
    histories, touched = RecordHistories(), []
    for n, r in enumerate(records, 1):
        if r["kind"] not in EVENT_KINDS:
            touched.append([])
            continue
        try:
            members = store.load(r["membership"])
            sha = store.file_sha256(r["membership"])
        except MembershipError as e:
            raise LedgerError(f"ledger line {n}: {e}") from None
        if sha != r["membership_sha256"] or len(members) != r.get("records_trained", r.get("records_counted")):
            raise LedgerError(f"ledger line {n}: membership file {store.path(r['membership'])} does not match the "
                              f"hash or record count the ledger line holds")
        touched.append(histories.add(record_event(r), r["membership"], members, extra_delta=record_extra_delta(r)))
    return histories, touched
