"""Caption datasets shared by every loader, generator and partitioner: in memory, or with the
images left on disk (`ImageRows`, a site's data store: shared_model/data/store.py).

A *record* is one image with all of its reference captions. It is FedCap's unit of
privacy: DP-SGD draws one of a record's captions per training example, so a record
contributes at most one gradient to any step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .rows import ImageRows


@dataclass(frozen=True)
class SkippedRecord:
    """A record a loader refused and skipped because the user asked to skip bad records."""

    source: str  # file the record came from
    record: str  # record identifier within that file (image id, line number, ...)
    reason: str


@dataclass
class CaptionSet:
    """Images and their reference captions.

    images:    uint8 [N, H, W, 3] RGB: a numpy array, or `ImageRows` (rows read from disk on
               demand; `subset` then copies no pixel)
    captions:  N tuples of raw caption strings (at least one each)
    image_ids: N unique string ids
    labels:    optional int [N], one attribute per image used for label-skew partitioning
    skipped:   records a loader skipped (empty unless skipping was requested)
    source_digests: optional N SHA-256 hex digests of each image's source file bytes (set by the
               folder loaders), so a record's identity does not depend on the decoding size
    """

    images: np.ndarray | ImageRows
    captions: list[tuple[str, ...]]
    image_ids: list[str]
    labels: np.ndarray | None = None
    skipped: list[SkippedRecord] = field(default_factory=list)
    source_digests: list[str] | None = None

    def __post_init__(self) -> None:
        in_memory = isinstance(self.images, np.ndarray)
        if not isinstance(self.images, ImageRows) and (not in_memory or self.images.dtype != np.uint8):
            raise TypeError(f"images must be a uint8 numpy array or ImageRows, got {type(self.images).__name__}"
                            f"{' of ' + str(self.images.dtype) if in_memory else ''}")
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must have shape [N, H, W, 3], got {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if len(self.captions) != n or len(self.image_ids) != n:
            raise ValueError(
                f"images, captions and image_ids must have the same length, got "
                f"{n}, {len(self.captions)} and {len(self.image_ids)}"
            )
        for image_id, caps in zip(self.image_ids, self.captions):
            if len(caps) == 0:
                raise ValueError(f"image {image_id!r} has no caption")
        if len(set(self.image_ids)) != n:
            raise ValueError("image_ids must be unique")
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"labels must have length {n}, got {len(self.labels)}")
        if self.source_digests is not None and len(self.source_digests) != n:
            raise ValueError(f"source_digests must have length {n}, got {len(self.source_digests)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "CaptionSet":
        idx = np.asarray(indices, dtype=np.int64)
        return CaptionSet(
            images=self.images.take(idx) if isinstance(self.images, ImageRows) else self.images[idx],
            captions=[self.captions[i] for i in idx],
            image_ids=[self.image_ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            source_digests=None if self.source_digests is None else [self.source_digests[i] for i in idx],
        )

    def references(self) -> dict[str, list[str]]:
        """image id -> reference captions, the form the metrics take."""
        return {i: list(c) for i, c in zip(self.image_ids, self.captions)}

    def record_ids(self) -> list[str]:
        """Each record's content ID: SHA-256 over its image (the source file's bytes when a loader
        read one, else the pixels) and its captions. It is the key of the record's privacy history
        in the site ledger, so it must not change when the same record is loaded again (another
        run, a restart, another decoding size) and it never leaves the site. The image id is not
        part of it: renaming a file does not make a record new."""
        ids = []
        for k in range(len(self)):
            h = hashlib.sha256(b"fedcap-record/1\0")
            if self.source_digests is not None:
                h.update(b"file\0" + self.source_digests[k].encode())
            else:
                h.update(b"pixels\0" + repr(self.images[k].shape).encode() + np.ascontiguousarray(self.images[k]).tobytes())
            for caption in self.captions[k]:
                h.update(b"\0caption\0" + caption.encode("utf-8"))
            ids.append(h.hexdigest())
        return ids
