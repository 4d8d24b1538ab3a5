"""Canary records for the one-run privacy audit and their scores against a trained model (torch).

Canaries are records (an image with one caption) unlike the embedded scenes; each joins one site's
training data by an independent fair coin (docs/empirical-audit.md). The bound computed from their
scores lives in audit/canary_bound.py.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from shared_model.data.checks import check_int
from shared_model.data.datasets import encode_captions, image_tensor
from shared_model.data.records import CaptionSet
from shared_model.data.rows import ImageRows
from shared_model.data.synthetic import synthetic_vocabulary
from shared_model.data.vocab import SPECIALS, Vocabulary
from shared_model.model.captioner import caption_loss

CAPTION_WORDS = 8  # random words per canary caption (fits max_len >= 10)
PATTERN_CELLS = 8  # canary images: an 8 x 8 grid of random colours plus pixel noise


# ---- canaries and coins ------------------------------------------------------------------------

def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence((check_int("seed", seed, 0), 0xCA1A, stream)))


def make_canaries(count: int, *, seed: int, image_size: int, vocab: Vocabulary | None = None) -> CaptionSet:
    """`count` canary records, deterministic in (count, seed, image_size): an image of random colour
    blocks with pixel noise (nothing like the dark synthetic scenes) and one caption of
    CAPTION_WORDS words drawn uniformly from `vocab` (default: the embedded synthetic vocabulary).
    Ids are "canary-<seed>-<i>"; labels are -1 (no class)."""
    count = check_int("count", count, 1)
    image_size = check_int("image_size", image_size, PATTERN_CELLS)
    words = [w for w in (vocab or synthetic_vocabulary()).itos if w not in SPECIALS]
    rng = _rng(seed, 0)
    cell = -(-image_size // PATTERN_CELLS)
    blocks = rng.integers(0, 256, (count, PATTERN_CELLS, PATTERN_CELLS, 3))
    images = np.repeat(np.repeat(blocks, cell, axis=1), cell, axis=2)[:, :image_size, :image_size]
    images = np.clip(images + rng.integers(-24, 25, images.shape), 0, 255).astype(np.uint8)  # [count, S, S, 3]
    picks = rng.integers(0, len(words), (count, CAPTION_WORDS))
    captions = [(" ".join(words[j] for j in row),) for row in picks]
    return CaptionSet(images=images, captions=captions, image_ids=[f"canary-{seed}-{i}" for i in range(count)],
                      labels=np.full(count, -1, dtype=np.int64))


def draw_membership(count: int, *, seed: int) -> np.ndarray:
    """Independent fair coins, bool [count]: True = the canary is in the training data. A stream
    separate from the canaries' content, deterministic in (count, seed)."""
    return _rng(seed, 1).random(check_int("count", count, 1)) < 0.5


def included_canaries(count: int, *, seed: int, image_size: int) -> CaptionSet:
    """The canaries whose coin came up "in", in canary order."""
    canaries = make_canaries(count, seed=seed, image_size=image_size)
    return canaries.subset(np.flatnonzero(draw_membership(count, seed=seed)))


def append_records(data: CaptionSet, extra: CaptionSet) -> CaptionSet:
    """`data` followed by `extra` (labels -1 where one side has none)."""
    if data.images.shape[1:] != extra.images.shape[1:]:
        raise ValueError(f"image shapes differ: {data.images.shape[1:]} and {extra.images.shape[1:]}")
    labels = None
    if data.labels is not None or extra.labels is not None:
        labels = np.concatenate([_labels(data), _labels(extra)])
    on_disk = any(isinstance(d.images, ImageRows) for d in (data, extra))  # a data store: read no pixel
    images = ImageRows.concat([data.images, extra.images]) if on_disk else np.concatenate([data.images, extra.images])
    return CaptionSet(images=images, captions=[*data.captions, *extra.captions],
                      image_ids=[*data.image_ids, *extra.image_ids], labels=labels)


def _labels(data: CaptionSet) -> np.ndarray:
    return data.labels if data.labels is not None else np.full(len(data), -1, dtype=np.int64)


# ---- scoring -----------------------------------------------------------------------------------

@torch.no_grad()
def canary_scores(model: nn.Module, canaries: CaptionSet, vocab: Vocabulary, *, batch_size: int = 128,
                  device: torch.device | str = "cpu") -> np.ndarray:
    """Per-canary score, float [m]: the model's per-caption loss, averaged over the record's
    captions. Lower = more likely a member. Uses only the model and the canaries, not the coins."""
    model.eval()
    ids, counts = encode_captions(canaries.captions, vocab, max_len=model.config.max_len)  # [m, K, L], [m]
    scores = np.empty(len(canaries))
    for start in range(0, len(canaries), batch_size):
        images = image_tensor(canaries.images[start: start + batch_size]).to(device)  # [B, 3, S, S]
        caps, n = ids[start: start + batch_size].to(device), counts[start: start + batch_size]
        total = torch.zeros(len(images), device=device)
        for k in range(caps.shape[1]):
            logits, _ = model(images, caps[:, k])  # [B, L-1, V]
            loss = caption_loss(logits, caps[:, k, 1:], reduction="none")  # [B]
            total += torch.where(torch.as_tensor(k < n, device=device), loss, torch.zeros_like(loss))
        scores[start: start + len(images)] = (total.cpu() / n).numpy()
    return scores
