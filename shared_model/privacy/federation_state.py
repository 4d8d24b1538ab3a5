"""The federation state file: the server's witness of each site's ledger head, kept across runs
(server/witness.py decides what to keep; this module alone reads and writes the file).

File (`fedcap-federation-state/2`, JSON): {"format", "sites": {name: {"head", "lines", "run_id",
"server_round", "time"}}}, written atomically (util.atomic_write: fsynced, renamed). Format /1 named
"lines" "records"; it is read as well. The heads are hashes: they reveal nothing about the records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared_model.util import atomic_write

FEDERATION_STATE_FORMAT = "fedcap-federation-state/2"
OLD_FORMAT = "fedcap-federation-state/1"  # the same, with a head's line count under "records"


def load_federation_state(path: str | Path) -> dict[str, dict[str, Any]]:
    """site -> {"head", "lines", ...} from the file at `path`; {} for a missing file (a /1 file is
    read as well); ValueError naming the file when it is malformed."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") not in (FEDERATION_STATE_FORMAT, OLD_FORMAT):
            raise ValueError(f"format must be {FEDERATION_STATE_FORMAT!r}")
        if not isinstance(doc.get("sites"), dict):
            raise ValueError("'sites' must be an object")
        if doc["format"] == OLD_FORMAT:
            doc["sites"] = {site: {("lines" if k == "records" else k): v for k, v in head.items()}
                            if isinstance(head, dict) else head for site, head in doc["sites"].items()}
        for site, head in doc["sites"].items():
            if not (isinstance(head, dict) and isinstance(head.get("head"), str)
                    and isinstance(head.get("lines"), int) and not isinstance(head.get("lines"), bool)):
                raise ValueError(f"site {site!r} needs a str 'head' and an int 'lines', got {head!r}")
    except (OSError, ValueError) as e:
        raise ValueError(f"federation state {path} is not a valid {FEDERATION_STATE_FORMAT} file "
                         f"({type(e).__name__}: {e})") from None
    return doc["sites"]


def save_federation_state(path: str | Path, sites: dict[str, dict[str, Any]]) -> None:
    """Write `sites` as the federation state file at `path`, atomically."""
    doc = {"format": FEDERATION_STATE_FORMAT, "sites": sites}
    atomic_write(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))
