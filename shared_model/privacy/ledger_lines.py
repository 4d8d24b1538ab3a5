"""The site ledger's lines: their format, fields and hash chain, the mechanism each event line
stands for, and the head the server witnesses. One JSON object per line (JSON Lines).

Common fields: format, kind, run_id, time (UTC), prev_hash, hash. `hash` is the SHA-256 of the
line's canonical JSON without `hash`; `prev_hash` is the previous line's hash (64 zeros for the
first), so an edited, removed, reordered or truncated-then-extended ledger fails verification. The
head (last hash, number of lines) is witnessed by the server every round and checked by the site at
the next one, which catches a ledger deleted, replaced by an older backup or rewritten.

Line kinds and their fields: `FIELDS`. A line is checked by `check_line` (format, kind, fields, types
and ranges) before anything reads it; a malformed one is a LedgerError naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from shared_model.privacy.accounting import OPACUS_ACCOUNTANTS, DPSGDEvent, check_accountant, gaussian_event

FORMAT = "fedcap-ledger/2"
OLD_FORMATS = ("fedcap-ledger/1",)
GENESIS = "0" * 64
COMMON = ("format", "kind", "run_id", "time", "prev_hash", "hash")
FIELDS = {
    "grant": COMMON + ("requested_epsilon", "granted_epsilon", "noise_multiplier", "sample_rate", "planned_steps",
                       "num_rounds", "local_epochs", "batch_size", "records", "spent_before", "target_epsilon",
                       "target_delta", "accountant", "init_checkpoint"),
    "dp-sgd": COMMON + ("server_round", "membership", "membership_sha256", "records_trained", "records_retired",
                        "sample_rate", "noise_multiplier", "steps", "max_grad_norm", "target_epsilon",
                        "target_delta", "accountant", "epsilon", "init_checkpoint"),
    "vocab-gaussian": COMMON + ("membership", "membership_sha256", "records_counted", "records_retired",
                                "noise_multiplier", "max_words_per_record", "threshold", "threshold_delta",
                                "words_released", "target_epsilon", "target_delta", "accountant", "epsilon"),
    "count-gaussian": COMMON + ("membership", "membership_sha256", "records_counted", "noise_multiplier",
                                "noisy_count", "target_epsilon", "target_delta", "accountant", "epsilon"),
}
# lines that are a mechanism over the records of their membership
EVENT_KINDS = ("dp-sgd", "vocab-gaussian", "count-gaussian")
MIGRATE_HINT = "migrate it with `fedcap ledger migrate STATE_DIR --data-dir DIR --format FORMAT` (docs/privacy.md)"


class LedgerError(ValueError):
    """The ledger file is malformed, its hash chain is broken, or its membership files are."""


class LedgerRollbackError(LedgerError):
    """The ledger does not contain the head the server witnessed: lost, rolled back or rewritten."""


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def record_event(record: dict[str, Any]) -> DPSGDEvent:
    """The mechanism of an event line (dp-sgd, vocab-gaussian, count-gaussian) as an accounting event."""
    if record["kind"] in ("vocab-gaussian", "count-gaussian"):
        return gaussian_event(noise_multiplier=record["noise_multiplier"])
    return DPSGDEvent(sample_rate=record["sample_rate"], noise_multiplier=record["noise_multiplier"],
                      steps=record["steps"])


def record_extra_delta(record: dict[str, Any]) -> float:
    """The delta an event line adds beyond its accountant's (a vocabulary release's thresholding)."""
    return float(record["threshold_delta"]) if record["kind"] == "vocab-gaussian" else 0.0


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_line(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise LedgerError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if record.get("format") in OLD_FORMATS:
        raise LedgerError(f"{where}: format {record['format']!r} keys spending by a whole-dataset fingerprint, "
                          f"which adding one record resets; {MIGRATE_HINT}")
    if record.get("format") != FORMAT:
        raise LedgerError(f"{where}: format must be {FORMAT!r}, got {record.get('format')!r}")
    kind = record.get("kind")
    if kind not in FIELDS:
        raise LedgerError(f"{where}: kind must be one of {sorted(FIELDS)}, got {kind!r}")
    missing = [f for f in FIELDS[kind] if f not in record]
    if missing:
        raise LedgerError(f"{where}: missing fields {missing}")
    try:
        check_accountant(record["accountant"], OPACUS_ACCOUNTANTS)
    except ValueError:
        raise LedgerError(f"{where}: unknown accountant {record['accountant']!r}") from None
    if not (_number(record["target_delta"]) and 0 < record["target_delta"] < 1):
        raise LedgerError(f"{where}: target_delta must be in (0, 1), got {record['target_delta']!r}")
    if not (_number(record["target_epsilon"]) and record["target_epsilon"] > 0):
        raise LedgerError(f"{where}: target_epsilon must be a number > 0, got {record['target_epsilon']!r}")
    if kind == "vocab-gaussian":
        if not (_number(record["threshold_delta"]) and 0 < record["threshold_delta"] < 1):
            raise LedgerError(f"{where}: threshold_delta must be in (0, 1), got {record['threshold_delta']!r}")
        if not (isinstance(record["max_words_per_record"], int) and record["max_words_per_record"] >= 1):
            raise LedgerError(f"{where}: max_words_per_record must be an int >= 1, got "
                              f"{record['max_words_per_record']!r}")
    if kind in EVENT_KINDS:
        if not (_number(record["epsilon"]) and record["epsilon"] >= 0):
            raise LedgerError(f"{where}: epsilon must be a number >= 0, got {record['epsilon']!r}")
        try:
            record_event(record)
        except (ValueError, TypeError) as e:
            raise LedgerError(f"{where}: {e}") from None


def ledger_head(records: list[dict[str, Any]]) -> tuple[str, int]:
    """(last hash, number of lines): what the server witnesses."""
    return (records[-1]["hash"] if records else GENESIS), len(records)


def check_witness(records: list[dict[str, Any]], *, head: str, count: int, path: Path) -> None:
    """LedgerRollbackError unless line `count` of the ledger has hash `head` (the server's witness)."""
    if count == 0:
        return
    if len(records) < count or records[count - 1]["hash"] != head:
        raise LedgerRollbackError(
            f"ledger {path} was lost or rolled back: the server witnessed {count} line(s) ending in hash "
            f"{head[:16]}.., but this ledger has {len(records)} line(s)"
            + (f" ending in {records[-1]['hash'][:16]}.." if records else "")
            + ". The site refuses to train, since its privacy spending would restart from an old state. Restore "
              "the ledger and its membership/ folder from the mirror (node_config ledger-mirror-dir) or a backup "
              "that holds the witnessed line; see docs/privacy.md, 'Lost or rolled-back ledgers'.")
