"""Which records each DP-SGD event sampled from: content-addressed membership files beside the ledger.

Privacy unit: one record (an image with its captions) at one site, identified by its content ID
(`CaptionSet.record_ids`: SHA-256 of the image's bytes and its captions; it never leaves the site).
Every DP-SGD event in the site ledger names the exact set of record IDs it Poisson-sampled from by
that set's *version*: the SHA-256 of the sorted IDs (`membership_version`). Each distinct set is
stored once, in `membership/<version>.json`, as additions and removals against a base version (a
full snapshot every SNAPSHOT_EVERY versions bounds the chain), so a large site that adds a few
records a day writes kilobytes per new version and nothing for a round on an unchanged set.

A file is self-verifying: the set rebuilt by applying its delta to its base must hash to the
version in its name, so an edited, swapped or truncated file is detected whichever event cites it.

File format (JSON, `fedcap-membership/1`):
  {"format": "fedcap-membership/1", "version": V, "base": B or null, "depth": d,
   "count": n, "added": [sorted IDs], "removed": [sorted IDs]}
An auditor rebuilds the set of V by rebuilding B (recursively; null = the empty set), removing
`removed`, adding `added`, and checks len == count and membership_version(set) == V.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from shared_model.util import atomic_write

FORMAT = "fedcap-membership/1"
SNAPSHOT_EVERY = 64  # chain depth after which a version is stored whole


class MembershipError(ValueError):
    """A membership file is missing, malformed, or does not rebuild to its version."""


def membership_version(record_ids: Iterable[str]) -> str:
    """SHA-256 over the sorted, distinct record IDs: the name of that set of records."""
    h = hashlib.sha256(b"fedcap-membership/1\n")
    for rid in sorted(set(record_ids)):
        h.update(rid.encode() + b"\n")
    return h.hexdigest()


class MembershipStore:
    """The `membership/` folder of one site's state dir."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._cache: dict[str, frozenset[str]] = {}

    def path(self, version: str) -> Path:
        return self.folder / f"{version}.json"

    def put(self, record_ids: Iterable[str], *, base: str | None = None) -> str:
        """Store the set (as a delta against `base` when given and stored) and return its version.
        Storing a set that is already stored writes nothing."""
        members = frozenset(record_ids)
        version = membership_version(members)
        if self.path(version).is_file():
            self.load(version)  # verify what is there
            return version
        base_set: frozenset[str] = frozenset()
        depth = 0
        if base is not None and self.path(base).is_file():
            base_set = self.load(base)
            depth = self._doc(base)["depth"] + 1
        if base is None or depth >= SNAPSHOT_EVERY or not self.path(base).is_file():
            base, base_set, depth = None, frozenset(), 0
        doc = {"format": FORMAT, "version": version, "base": base, "depth": depth, "count": len(members),
               "added": sorted(members - base_set), "removed": sorted(base_set - members)}
        atomic_write(self.path(version), json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
        self._cache[version] = members
        return version

    def load(self, version: str) -> frozenset[str]:
        """The set of record IDs named `version`, rebuilt from its chain and verified."""
        if version in self._cache:
            return self._cache[version]
        chain, v = [], version
        while v is not None:  # walk to a snapshot or a cached version
            if v in self._cache:
                break
            doc = self._doc(v)
            chain.append(doc)
            v = doc["base"]
            if len(chain) > SNAPSHOT_EVERY + 1:
                raise MembershipError(f"membership {version}: base chain longer than {SNAPSHOT_EVERY + 1}")
        members = set(self._cache[v]) if v is not None else set()
        for doc in reversed(chain):
            members.difference_update(doc["removed"])
            members.update(doc["added"])
            frozen = frozenset(members)
            if len(frozen) != doc["count"] or membership_version(frozen) != doc["version"]:
                raise MembershipError(f"membership file {self.path(doc['version'])} does not rebuild to its "
                                      f"version (edited, swapped or truncated)")
            self._cache[doc["version"]] = frozen
        return self._cache[version]

    def file_sha256(self, version: str) -> str:
        try:
            return hashlib.sha256(self.path(version).read_bytes()).hexdigest()
        except OSError as e:
            raise MembershipError(f"membership file {self.path(version)} cannot be read: {e}") from None

    def _doc(self, version: str) -> dict:
        path = self.path(version)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MembershipError(f"membership file {path} is missing (the ledger cites it)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MembershipError(f"membership file {path} is unreadable: {e}") from None
        keys = ("format", "version", "base", "depth", "count", "added", "removed")
        if not isinstance(doc, dict) or any(k not in doc for k in keys) or doc["format"] != FORMAT \
                or doc["version"] != version:
            raise MembershipError(f"membership file {path} is not a {FORMAT} file for version {version}")
        return doc
