"""Partitioners: disjoint, covering, seeded, and skewed as asked; the hash split keeps every copy
of one image on one side, and splits unique images by the decile of each id."""

import hashlib
import re

import numpy as np
import pytest

from shared_model.data.partition import (dirichlet_label_partition, iid_partition, partition_caption_set,
    quantity_skew_partition)
from shared_model.data.partition import hash_split
from shared_model.data.records import CaptionSet
from shared_model.data.synthetic import generate_scenes

LABELS = np.random.default_rng(0).integers(0, 5, 2000)


def assert_partition(parts: list[np.ndarray], n: int, num_partitions: int) -> None:
    assert len(parts) == num_partitions
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def mean_label_distance(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total variation distance between each site's label distribution and the global one."""
    classes = np.unique(labels)
    overall = np.array([np.mean(labels == c) for c in classes])
    return float(np.mean([0.5 * np.abs(np.array([np.mean(labels[p] == c) for c in classes]) - overall).sum()
                          for p in parts]))


PARTITIONERS = {
    "iid": lambda seed: iid_partition(2000, 8, seed=seed),
    "dirichlet": lambda seed: dirichlet_label_partition(LABELS, 8, alpha=0.3, seed=seed),
    "quantity": lambda seed: quantity_skew_partition(2000, 8, alpha=0.5, seed=seed),
}


@pytest.mark.parametrize("name", PARTITIONERS)
def test_disjoint_covering_and_seeded(name):
    parts = PARTITIONERS[name](1)
    assert_partition(parts, 2000, 8)
    again = PARTITIONERS[name](1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = PARTITIONERS[name](2)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_balanced():
    sizes = [len(p) for p in iid_partition(1003, 4, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_skewed():
    iid = mean_label_distance(LABELS, iid_partition(len(LABELS), 8, seed=0))
    skewed = mean_label_distance(LABELS, dirichlet_label_partition(LABELS, 8, alpha=0.1, seed=0))
    mild = mean_label_distance(LABELS, dirichlet_label_partition(LABELS, 8, alpha=100.0, seed=0))
    assert iid < 0.1 and mild < 0.1
    assert skewed > 0.4


def test_min_size_is_respected():
    labels = np.repeat(np.arange(3), [60, 30, 10])
    for seed in range(5):
        parts = dirichlet_label_partition(labels, 5, alpha=0.1, seed=seed, min_size=8)
        assert_partition(parts, 100, 5)
        assert min(len(p) for p in parts) >= 8
        parts = quantity_skew_partition(100, 5, alpha=0.1, seed=seed, min_size=15)
        assert_partition(parts, 100, 5)
        assert min(len(p) for p in parts) >= 15


def test_quantity_skew_sizes_vary():
    sizes = [len(p) for p in quantity_skew_partition(2000, 8, alpha=0.3, seed=0)]
    assert max(sizes) > 3 * min(sizes)


def test_partition_caption_set():
    data = generate_scenes(120, seed=0)
    for method in ("iid", "dirichlet", "quantity"):
        sites = partition_caption_set(data, 4, method=method, alpha=0.5, seed=0, min_size=5)
        assert len(sites) == 4 and sum(len(s) for s in sites) == 120
        ids = [i for s in sites for i in s.image_ids]
        assert sorted(ids) == sorted(data.image_ids)
        assert all(len(s) >= 5 for s in sites)
        first = sites[0]
        k = data.image_ids.index(first.image_ids[0])
        np.testing.assert_array_equal(first.images[0], data.images[k])
        assert first.captions[0] == data.captions[k] and first.labels[0] == data.labels[k]


@pytest.mark.parametrize("call, message", [
    (lambda: iid_partition(10, 0, seed=0), "num_partitions must be >= 1, got 0"),
    (lambda: iid_partition(3, 4, seed=0), "n=3"),
    (lambda: quantity_skew_partition(10, 2, alpha=-1.0, seed=0), "alpha must be > 0 and finite, got -1.0"),
    (lambda: quantity_skew_partition(10, 2, alpha=float("nan"), seed=0), "got nan"),
    (lambda: quantity_skew_partition(10, 2, alpha=1.0, seed=0, min_size=0), "min_size must be >= 1, got 0"),
    (lambda: dirichlet_label_partition(np.zeros(10, int), 4, alpha=1.0, seed=0, min_size=3), "at least 3 records each"),
    (lambda: dirichlet_label_partition(np.repeat([0, 1], 50), 4, alpha=1e-3, seed=0, min_size=20),
     "raise alpha"),
    (lambda: partition_caption_set(generate_scenes(8, seed=0), 2, method="random"), "'random'"),
    (lambda: partition_caption_set(generate_scenes(8, seed=0), 4, min_size=3), "n=8"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_dirichlet_needs_labels():
    data = generate_scenes(8, seed=0)
    unlabelled = CaptionSet(images=data.images, captions=data.captions, image_ids=data.image_ids)
    with pytest.raises(ValueError, match="labels"):
        partition_caption_set(unlabelled, 2, method="dirichlet")
    with pytest.raises(TypeError):
        dirichlet_label_partition(np.zeros(10), 2, alpha=1.0, seed=0)


def with_copies(data: CaptionSet, copies: dict[int, list[int]], *, digests: bool) -> CaptionSet:
    """`data` with record k's image also at each record of copies[k] (their ids and captions kept);
    with `digests`, as a folder loader reads them: by source-file digest, the pixels left as they are."""
    images, source = data.images.copy(), [f"file-{k}" for k in range(len(data))]
    for k, others in copies.items():
        for j in others:
            if digests:
                source[j] = source[k]
            else:
                images[j] = images[k]
    return CaptionSet(images=images, captions=data.captions, image_ids=data.image_ids,
                      source_digests=source if digests else None)


def decile(image_id: str) -> int:
    """The first 8 hex digits of the id's SHA-256, mod 10: 0 is held out."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) % 10


@pytest.mark.parametrize("digests", [False, True], ids=["pixels", "source-digests"])
def test_copies_of_one_image_never_straddle_the_split(digests):
    base = generate_scenes(40, seed=0, image_size=32)
    straddled = 0  # trials in which the old rule (each id on its own) split the three copies
    for trial in range(60):
        ids = [f"img-{trial}-{k}" for k in range(40)]
        data = with_copies(CaptionSet(images=base.images, captions=base.captions, image_ids=ids),
                           {3: [17, 31]}, digests=digests)
        kept, held = hash_split(data)
        copies = [ids[k] for k in (3, 17, 31)]
        assert set(copies) <= set(kept.image_ids) or set(copies) <= set(held.image_ids), trial
        assert len(kept) + len(held) == 40 and len(held) >= 1 and len(kept) >= 1
        others = [i for i in ids if i not in copies and decile(i) == 0]
        if others:  # no fallback: every other record as its id's decile says, the copies as the smallest's
            assert [i for i in held.image_ids if i not in copies] == others, trial
            assert (copies[0] in held.image_ids) == (decile(min(copies)) == 0), trial
        straddled += len({decile(i) == 0 for i in copies}) == 2
    assert straddled > 0


def test_the_split_of_unique_images_is_the_decile_of_each_id():
    for n, seed in [(200, 0), (37, 1), (5, 2), (2, 3)]:
        data = generate_scenes(n, seed=seed, image_size=32)
        data.image_ids = [f"photo-{seed}-{k}.jpg" for k in range(n)]
        buckets = np.array([decile(i) for i in data.image_ids])
        held = np.flatnonzero(buckets < 1)  # the rule before copies were grouped, fallback included
        if len(held) == 0 or len(held) == n:
            held = np.arange(n - max(1, n // 10), n)
        kept = np.setdiff1d(np.arange(n), held)
        new_kept, new_held = hash_split(data)
        assert new_kept.image_ids == [data.image_ids[k] for k in kept]
        assert new_held.image_ids == [data.image_ids[k] for k in held]


def test_hash_split_falls_back_to_whole_groups_and_names_the_count():
    data = generate_scenes(3, seed=0, image_size=32)
    data.image_ids = ["b", "c", "d"]  # none in the first decile: the last record's group is held out
    assert not any(decile(i) == 0 for i in data.image_ids)
    kept, held = hash_split(with_copies(data, {1: [2]}, digests=False))
    assert kept.image_ids == ["b"] and held.image_ids == ["c", "d"]
    # the last two records' groups would be all 20: only the last record's is held out
    data = generate_scenes(20, seed=0, image_size=32)
    data.image_ids = ["b"] + [f"x{k:02d}" for k in range(18)] + ["c"]
    kept, held = hash_split(with_copies(data, {0: list(range(1, 19))}, digests=True))
    assert held.image_ids == ["c"] and len(kept) == 19
    with pytest.raises(ValueError, match=re.escape("site has 3 record(s) of 1 distinct image(s): too few")):
        hash_split(with_copies(data.subset([0, 1, 2]), {0: [1, 2]}, digests=True), what="site")
    with pytest.raises(ValueError, match=re.escape("dataset has 1 record(s) of 1 distinct image(s)")):
        hash_split(data.subset([0]))
