"""A site's records kept on its own disk as a data store, so a message neither decodes every image
again nor holds every image in memory (shared_model/data/store.py: the files and their checks).

The cache key is a SHA-256 over the loader settings and every file under the data folder (relative
path, size, modification time), so adding, removing, replacing or touching a file builds a new
store. The cache folder (client/settings.py `data_cache_dir`) is the site's own and never sent
anywhere; it keeps the KEEP most recently used stores. A store that cannot be opened (torn,
truncated, inconsistent) is rebuilt with a warning. Record content IDs travel with the store, so
the ledger sees exactly the records a fresh load would give.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

from shared_model.data.records import CaptionSet

log = logging.getLogger(__name__)
KEEP = 2  # stores kept per site (the most recently used)


def folder_key(root: Path, **settings) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name == ".fedcap-state":  # the site's binding of this folder (privacy/identity.py), not a record
                continue
            path = Path(dirpath) / name
            st = path.stat()
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_store(cache_dir: Path, key: str, build: Callable[[Path], CaptionSet]) -> tuple[CaptionSet, bool]:
    """(records, whether they came from an existing store). `build(stem)` writes the store
    `<cache_dir>/records-<key>` and returns it opened (store.build_store or store.write_store)."""
    from shared_model.data.store import StoreError, open_store, store_paths

    stem = Path(cache_dir) / f"records-{key[:32]}"
    npy, meta = store_paths(stem)
    if meta.exists() or npy.exists():
        try:
            data = open_store(stem)
            os.utime(meta)  # most recently used: kept by the pruning below
            return data, True
        except (OSError, StoreError) as e:
            log.warning("rebuilding the unusable data store %s: %s", stem, e)
    data = build(stem)
    _prune(Path(cache_dir))
    return data, False


def _prune(cache_dir: Path) -> None:
    """Keep the KEEP most recently used stores; remove older ones, image files left without their
    .json by a crash, and the one-file caches of earlier versions (records-*.npz)."""
    for old in cache_dir.glob("records-*.npz"):
        old.unlink(missing_ok=True)
    metas = sorted(cache_dir.glob("records-*.json"), key=lambda p: p.stat().st_mtime)
    for meta in metas[:-KEEP]:
        meta.unlink(missing_ok=True)  # the commit mark first: a half-removed store is never opened
        meta.with_suffix(".npy").unlink(missing_ok=True)
    for npy in cache_dir.glob("records-*.npy"):
        if not npy.with_suffix(".json").exists():
            npy.unlink(missing_ok=True)
