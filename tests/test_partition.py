"""Partitioners: disjoint, covering, seeded, and skewed as asked."""

import re

import numpy as np
import pytest

from shared_model.data import (dirichlet_label_partition, iid_partition, partition_caption_set,
                                    quantity_skew_partition)
from shared_model.data import CaptionSet, generate_scenes

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
