"""In-memory caption datasets shared by every loader, generator and partitioner.

A *record* is one image with all of its reference captions. It is FedCap's unit of
privacy: DP-SGD draws one of a record's captions per training example, so a record
contributes at most one gradient to any step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SkippedRecord:
    """A record a loader refused and skipped because the user asked to skip bad records."""

    source: str  # file the record came from
    record: str  # record identifier within that file (image id, line number, ...)
    reason: str


@dataclass
class CaptionSet:
    """Images and their reference captions, all in memory.

    images:    uint8 [N, H, W, 3] RGB
    captions:  N tuples of raw caption strings (at least one each)
    image_ids: N unique string ids
    labels:    optional int [N], one attribute per image used for label-skew partitioning
    skipped:   records a loader skipped (empty unless skipping was requested)
    """

    images: np.ndarray
    captions: list[tuple[str, ...]]
    image_ids: list[str]
    labels: np.ndarray | None = None
    skipped: list[SkippedRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise TypeError(f"images must be a uint8 numpy array, got {type(self.images).__name__}"
                            f"{'' if not isinstance(self.images, np.ndarray) else ' of ' + str(self.images.dtype)}")
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

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "CaptionSet":
        idx = np.asarray(indices, dtype=np.int64)
        return CaptionSet(
            images=self.images[idx],
            captions=[self.captions[i] for i in idx],
            image_ids=[self.image_ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
        )

    def references(self) -> dict[str, list[str]]:
        """image id -> reference captions, the form the metrics take."""
        return {i: list(c) for i, c in zip(self.image_ids, self.captions)}

    def fingerprint(self) -> str:
        """SHA-256 over ids, captions and pixels: the key under which a site's ledger accumulates
        privacy loss. Any change to the records gives a new fingerprint; the same data loaded
        again (another run, a restart) gives the same one."""
        h = hashlib.sha256(b"fedcap-dataset/1")
        h.update(repr(self.images.shape).encode())
        for image_id, caps in zip(self.image_ids, self.captions):
            h.update(repr((image_id, caps)).encode("utf-8"))
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()
