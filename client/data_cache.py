"""A site's decoded records cached on its own disk, so a message does not decode every image again.

Flower runs every message in a new process; decoding a folder of images costs seconds per message.
The cache key is a SHA-256 over the loader settings and every file under the data folder (relative
path, size, modification time), so adding, removing, replacing or touching a file invalidates it.
The cache lives in the site's state dir (never sent anywhere) as one `.npz` per key, written
atomically; a corrupt cache file is ignored and rewritten. Record content IDs travel with it
(`source_digests`), so the ledger sees exactly the records a fresh load would give.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from shared_model.data import CaptionSet
from shared_model.util import atomic_write

log = logging.getLogger(__name__)
KEEP = 2  # cache files kept per site (the newest)


def folder_key(root: Path, **settings) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            st = path.stat()
            h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_load(cache_dir: Path, key: str, load: Callable[[], CaptionSet]) -> tuple[CaptionSet, bool]:
    """(records, whether they came from the cache)."""
    path = cache_dir / f"records-{key[:32]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                data = CaptionSet(images=z["images"], captions=[tuple(c) for c in meta["captions"]],
                                  image_ids=meta["image_ids"], source_digests=meta["source_digests"])
            return data, True
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable data cache %s: %s", path, e)
    data = load()
    buffer = io.BytesIO()
    meta = {"captions": [list(c) for c in data.captions], "image_ids": data.image_ids,
            "source_digests": data.source_digests}
    np.savez(buffer, images=data.images, meta=np.array(json.dumps(meta)))
    atomic_write(path, buffer.getvalue())
    for old in sorted(cache_dir.glob("records-*.npz"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
        old.unlink(missing_ok=True)
    return data, False
