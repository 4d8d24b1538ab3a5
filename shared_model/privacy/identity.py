"""Which ledger record a loaded row is: record identity that survives ordinary edits (no Flower, no torch).

A record's privacy history is keyed by its record ID in the ledger's membership files. The first
time a row is seen, its record ID is its content ID (SHA-256 over its image and captions,
`CaptionSet.record_ids`). Each row also has two aliases:
  "image:<digest>"  the image's content (the source file's bytes, else the decoded pixels)
  "name:<id>"       the id the site's own files declare (COCO image id or file name, CSV/JSONL id)
and a row whose image OR declared id was seen before is the record it was seen as, whatever else
changed: its captions edited, reordered or cut, its file renamed, or re-encoded under the same
name. Aliases form a union: an identity, once tied to an alias, keeps it. So copies of one image
(same bytes) are one record at a site, and the site trains one of them per round. What still
counts as a new record: an image whose bytes change and whose declared id changes at the same time
(a re-encoded copy under a new name); near copies (resized, cropped) are not recognised.

A row whose aliases point to two different records (the image of one and the name of another) has
both histories; the site does not train it (it is counted as conflicting) rather than guess which.

File: `identities.json` beside the ledger, `{"format": "fedcap-identities/1", "aliases": {alias:
record ID}}`, written atomically under the ledger's lock before any training uses it. Losing it
is safe only while the site's data is unchanged (every row's content ID is its record ID again);
it is backed up and mirrored with the ledger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from shared_model.util import atomic_write

FORMAT = "fedcap-identities/1"


@dataclass
class Resolved:
    record_ids: list[str]    # each distinct record once
    rows: list[int]          # the row that stands for it this time
    duplicates: int          # rows left out: another row is the same record
    conflicts: int           # rows left out: their aliases name two records


def row_aliases(data) -> list[tuple[str, str]]:
    """(image alias, name alias) of every row of a CaptionSet."""
    out = []
    for k in range(len(data)):
        if data.source_digests is not None:
            image = data.source_digests[k]
        else:
            pixels = data.images[k]
            image = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
        out.append((f"image:{image}", f"name:{data.image_ids[k]}"))
    return out


class RecordIdentities:
    """The alias file of one site's ledger (`path` need not exist)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.aliases: dict[str, str] = {}
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
                if doc.get("format") != FORMAT or not isinstance(doc.get("aliases"), dict):
                    raise ValueError(f"format must be {FORMAT!r}")
            except (OSError, ValueError) as e:
                raise ValueError(f"record identities {self.path} are not a valid {FORMAT} file: {e}") from None
            self.aliases = {str(k): str(v) for k, v in doc["aliases"].items()}

    def resolve(self, content_ids: Sequence[str], aliases: Sequence[tuple[str, ...]]) -> Resolved:
        """The record of every row (registering new aliases; `save` writes them)."""
        ids, rows, seen, duplicates, conflicts = [], [], set(), 0, 0
        for k, (content, names) in enumerate(zip(content_ids, aliases)):
            known = {self.aliases[a] for a in names if a in self.aliases}
            if len(known) > 1:
                conflicts += 1
                continue
            record = known.pop() if known else content
            for a in names:
                self.aliases.setdefault(a, record)
            if record in seen:
                duplicates += 1
                continue
            seen.add(record)
            ids.append(record)
            rows.append(k)
        return Resolved(ids, rows, duplicates, conflicts)

    def save(self) -> None:
        doc = {"format": FORMAT, "aliases": dict(sorted(self.aliases.items()))}
        atomic_write(self.path, (json.dumps(doc, sort_keys=True) + "\n").encode("utf-8"))


def bind_data_dir(data_dir: str | Path, state_dir: str | Path) -> None:
    """A data dir is one site's: its records' histories live in one state dir. The first state dir
    to train on `data_dir` writes `<data_dir>/.fedcap-state` naming itself; another state dir is
    refused by name (two SuperNodes on one folder with two ledgers would each see half of every
    record's history). A read-only data dir cannot be bound: a warning says so."""
    import logging

    marker, state = Path(data_dir) / ".fedcap-state", str(Path(state_dir).expanduser().absolute())
    if marker.exists():
        bound = marker.read_text(encoding="utf-8").strip()
        if bound != state:
            raise ValueError(f"data-dir {data_dir} is bound to state-dir {bound} (its .fedcap-state file), not "
                             f"{state}: one folder of records has one ledger. Point this SuperNode at {bound}, or "
                             f"remove {marker} only if that state dir and its ledger are gone for good")
        return
    try:
        atomic_write(marker, (state + "\n").encode("utf-8"))
    except OSError as e:
        logging.getLogger(__name__).warning("data-dir %s is read-only (%s): it cannot be bound to state-dir %s; never "
                                            "give another SuperNode this folder with another state dir",
                                            data_dir, e, state)
