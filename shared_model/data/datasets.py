"""Torch datasets over a `CaptionSet`: one item per record (image + one of its captions)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .records import CaptionSet
from .rows import ImageRows
from .vocab import Vocabulary


def image_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def _image_rows(data: CaptionSet) -> Tensor | ImageRows:
    """In memory: uint8 [N, 3, H, W] (one tensor, shared with the numpy array when contiguous); on
    disk: the `ImageRows` themselves, read one row per item (memory does not grow with N)."""
    if isinstance(data.images, ImageRows):
        return data.images
    return torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2)


def _image_item(images: Tensor | ImageRows, i: int) -> Tensor:
    """Row i as float [3, H, W] in [0, 1]."""
    row = images[i]
    if isinstance(row, np.ndarray):  # [H, W, 3], read from disk
        row = torch.from_numpy(row).permute(2, 0, 1)
    return row.float().div_(255.0)


def encode_captions(captions: list[tuple[str, ...]], vocab: Vocabulary, *, max_len: int) -> tuple[Tensor, Tensor]:
    """-> ids [N, K, max_len] (pad-filled) and counts [N], K = most captions of one image."""
    k_max = max(len(c) for c in captions)
    ids = torch.full((len(captions), k_max, max_len), vocab.pad_id, dtype=torch.long)
    for i, caps in enumerate(captions):
        for k, text in enumerate(caps):
            enc = vocab.encode(text, max_len=max_len)
            ids[i, k, : len(enc)] = torch.tensor(enc)
    return ids, torch.tensor([len(c) for c in captions])


class CaptionDataset(Dataset):
    """Training view of a CaptionSet. Item i is (image [3, H, W], caption ids [max_len]) where the
    caption is drawn uniformly from record i's references at every access (torch's global RNG).

    One item per record keeps the record (an image with all its captions) the unit of privacy:
    under Poisson sampling a record joins a DP-SGD batch at most once.
    """

    def __init__(self, data: CaptionSet, vocab: Vocabulary, *, max_len: int) -> None:
        self.images = _image_rows(data)  # uint8 [N, 3, H, W], or ImageRows [N, H, W, 3] on disk
        self.captions, self.counts = encode_captions(data.captions, vocab, max_len=max_len)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        k = int(torch.randint(int(self.counts[i]), ()))
        return _image_item(self.images, i), self.captions[i, k]


class FeatureDataset(Dataset):
    """Training view of a CaptionSet whose images are replaced by precomputed features (the
    encoder's grid of each record: shared_model/model/features.py). Item i is (features[rows[i]]
    as float [G, D], one of record i's captions drawn as CaptionDataset draws it); `features` may be
    memory-mapped, read one row per item."""

    def __init__(self, data: CaptionSet, features: np.ndarray, rows: Sequence[int], vocab: Vocabulary, *,
                 max_len: int) -> None:
        self.features, self.rows = features, np.asarray(rows, dtype=np.int64)
        if len(self.rows) != len(data):
            raise ValueError(f"one feature row per record: {len(data)} records, {len(self.rows)} rows")
        self.captions, self.counts = encode_captions(data.captions, vocab, max_len=max_len)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        k = int(torch.randint(int(self.counts[i]), ()))
        return torch.from_numpy(np.array(self.features[self.rows[i]], dtype=np.float32)), self.captions[i, k]


class CaptionPairs(Dataset):
    """Evaluation view: every (image, reference caption) pair once, in order."""

    def __init__(self, data: CaptionSet, vocab: Vocabulary, *, max_len: int) -> None:
        self.images = _image_rows(data)
        captions, counts = encode_captions(data.captions, vocab, max_len=max_len)
        self.pairs = [(i, k) for i in range(len(counts)) for k in range(int(counts[i]))]
        self.captions = captions

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> tuple[Tensor, Tensor]:
        i, k = self.pairs[j]
        return _image_item(self.images, i), self.captions[i, k]
