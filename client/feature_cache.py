"""A site's encoder features, computed once per encoder and kept on its own disk beside its data
store (client/settings.py `data_cache_dir`), when the encoder does not train (model/features.py).

File: `<cache_dir>/features-<key>.npy`, float32 [N, G, D], one row per record of the site's
records in store order, written through util.atomic_file (a crash leaves no file or a whole one).
The key is a SHA-256 over the encoder's fingerprint (its weights and the image size) and the rows'
identities (each source file's digest, else each record's content ID), so new weights, another
image size or a changed folder compute new features; the files of other keys are removed once the
new one is written. A file that cannot be read as the expected array is rebuilt with a warning.
Like the data store, the features are a function of the site's private images: they are never
sent anywhere. A simulated site (no cache folder) keeps them in memory for the round.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from shared_model.data.records import CaptionSet
from shared_model.model.captioner import Captioner
from shared_model.model.features import encode_rows, encoder_fingerprint, grid_shape, in_memory_features, rows_digest
from shared_model.util import atomic_file, estimate

log = logging.getLogger(__name__)
REPORT_EVERY = 5.0  # seconds between progress lines


def site_features(model: Captioner, data: CaptionSet, *, cache_dir: Path | None,
                  device: torch.device | str = "cpu") -> tuple[np.ndarray, bool]:
    """(float32 [len(data), G, D] grids of `data`'s records, whether they came from the cache)."""
    if cache_dir is None:
        return in_memory_features(model, data.images, device=device), False
    rows = data.source_digests if data.source_digests is not None else data.record_ids()
    key = hashlib.sha256(f"{encoder_fingerprint(model)}\0{rows_digest(rows)}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"features-{key}.npy"
    shape = (len(data), *grid_shape(model))
    if path.exists():
        try:
            features = np.load(path, mmap_mode="r")
            if features.shape == shape and features.dtype == np.float32:
                return features, True
            raise ValueError(f"holds {features.dtype} {features.shape}, expected float32 {shape}")
        except (OSError, ValueError) as e:
            log.warning("rebuilding the unusable feature cache %s: %s", path, e)
    t0 = last = time.perf_counter()
    with atomic_file(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)

        def progress(done: int) -> None:  # a line every REPORT_EVERY seconds and at the end
            nonlocal last
            now = time.perf_counter()
            if done == shape[0] or now - last >= REPORT_EVERY:
                last = now
                log.info("encoder features: %d of %d records (%s)", done, shape[0], estimate(now - t0, done, shape[0]))

        encode_rows(model, data.images, out, device=device, progress=progress)
        out.flush()
        del out
    for old in Path(cache_dir).glob("features-*.npy"):
        if old != path:
            old.unlink(missing_ok=True)
    return np.load(path, mmap_mode="r"), False
