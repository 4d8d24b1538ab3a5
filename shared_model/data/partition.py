"""Seeded partitioners that split one dataset into sites: IID, label skew, quantity skew; and the
hash split of a dataset into kept and held-out records.

Each partitioner returns `num_partitions` sorted int64 index arrays that are disjoint and
together cover range(n). Label skew follows Hsu et al. (2019): for each class, the shares
of the sites are drawn from Dirichlet(alpha), so a small alpha concentrates each class on
few sites. Quantity skew draws the shares of the site sizes from Dirichlet(alpha).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from .checks import check_int
from .records import CaptionSet

METHODS = ("iid", "dirichlet", "quantity")
_MAX_DRAWS = 1000  # Dirichlet label draws tried before min_size is declared out of reach


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be > 0 and finite, got {alpha}")
    return float(alpha)


def _check_sizes(n: int, num_partitions: int, min_size: int) -> None:
    check_int("num_partitions", num_partitions, 1)
    check_int("min_size", min_size, 1)
    if n < num_partitions * min_size:
        raise ValueError(f"cannot give {num_partitions} partitions at least {min_size} records each "
                         f"from n={n} records")


def _split_sorted(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return [np.sort(part).astype(np.int64) for part in np.split(order, np.cumsum(sizes)[:-1])]


def iid_partition(n: int, num_partitions: int, *, seed: int) -> list[np.ndarray]:
    """A random split into near-equal parts (sizes differ by at most one)."""
    n = check_int("n", n, 1)
    _check_sizes(n, num_partitions, 1)
    order = np.random.default_rng(check_int("seed", seed, 0)).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_partitions)]


def dirichlet_label_partition(labels: np.ndarray, num_partitions: int, *, alpha: float, seed: int,
                              min_size: int = 1) -> list[np.ndarray]:
    """Label skew: each class is split over the sites with shares ~ Dirichlet(alpha), redrawn
    until every site holds at least min_size records."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    _check_sizes(len(labels), num_partitions, min_size)
    alpha = _check_alpha(alpha)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for members in by_class:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].append(chunk)
        if min(sum(len(c) for c in chunks) for chunks in parts) >= min_size:
            return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) label split gave each of {num_partitions} partitions "
                     f"min_size={min_size} records in {_MAX_DRAWS} draws; raise alpha or lower "
                     f"num_partitions or min_size")


def quantity_skew_partition(n: int, num_partitions: int, *, alpha: float, seed: int,
                            min_size: int = 1) -> list[np.ndarray]:
    """Quantity skew: min_size records per site, the rest shared with proportions ~ Dirichlet(alpha)."""
    n = check_int("n", n, 1)
    _check_sizes(n, num_partitions, min_size)
    alpha = _check_alpha(alpha)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    order = rng.permutation(n)
    shares = rng.dirichlet(np.full(num_partitions, alpha))
    sizes = min_size + rng.multinomial(n - num_partitions * min_size, shares)
    return _split_sorted(order, sizes)


def partition_caption_set(data: CaptionSet, num_partitions: int, *, method: str = "iid", alpha: float = 0.5,
                          seed: int = 0, min_size: int = 1) -> list[CaptionSet]:
    """Split a CaptionSet into sites with one of METHODS; "dirichlet" skews data.labels."""
    if not isinstance(data, CaptionSet):
        raise TypeError(f"data must be a CaptionSet, got {type(data).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "iid":
        _check_sizes(len(data), num_partitions, min_size)
        parts = iid_partition(len(data), num_partitions, seed=seed)
    elif method == "dirichlet":
        if data.labels is None:
            raise ValueError("method 'dirichlet' needs data.labels (one label per record), got None")
        parts = dirichlet_label_partition(data.labels, num_partitions, alpha=alpha, seed=seed, min_size=min_size)
    else:
        parts = quantity_skew_partition(len(data), num_partitions, alpha=alpha, seed=seed, min_size=min_size)
    return [data.subset(part) for part in parts]


def _image_groups(data: CaptionSet) -> np.ndarray:
    """Each record's image group [N]: records with the same image content (the source file's bytes
    digest when a loader read one, else the pixels) share a group, numbered by first appearance."""
    keys = data.source_digests if data.source_digests is not None else \
        [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in data.images]
    first: dict[str, int] = {}
    return np.array([first.setdefault(key, len(first)) for key in keys], dtype=np.int64)


def _decile(image_id: str) -> int:
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) % 10


def hash_split(data: CaptionSet, *, what: str = "dataset") -> tuple[CaptionSet, CaptionSet]:
    """(kept, held out): every copy of one image goes to the same side, held out when the group's
    smallest image id hashes into the first decile (with every image unique: each record whose
    id does). When that holds out none or all, the whole groups of the last records are held
    out, at least max(1, n // 10) records (only the last record's group if that would be all).
    Deterministic in the ids and image contents, so the same records are held out in every
    round, run and restart, and the rest is the same training set every time; ValueError naming
    the count when nothing is kept."""
    n = len(data)
    groups = _image_groups(data)
    smallest: dict[int, str] = {}
    for group, image_id in zip(groups.tolist(), data.image_ids):
        smallest[group] = min(smallest.get(group, image_id), image_id)
    held_groups = np.array([_decile(smallest[g]) < 1 for g in range(len(smallest))], dtype=bool)
    held = held_groups[groups]  # [N]
    if not held.any() or held.all():
        held = np.zeros(n, dtype=bool)
        for k in range(n - 1, -1, -1):
            if held.sum() >= max(1, n // 10):
                break
            held |= groups == groups[k]
        if held.all() and n:
            held = groups == groups[-1]
    if held.all():
        raise ValueError(f"{what} has {n} record(s) of {len(smallest)} distinct image(s): too few to hold some out")
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))
