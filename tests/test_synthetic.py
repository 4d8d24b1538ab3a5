"""The embedded synthetic dataset and the feature-skew transforms."""

import re

import numpy as np
import pytest

from shared_model.data.records import CaptionSet
from shared_model.data.skew import SKEW_KINDS, apply_feature_skew, site_feature_skews
from shared_model.data.synthetic import COLOURS, SHAPES, SPLITS, generate_scenes, load_embedded, synthetic_vocabulary
from shared_model.data.vocab import tokenize

COUNT_WORDS = {"one": 1, "two": 2, "three": 3}


@pytest.fixture(scope="module")
def scenes() -> CaptionSet:
    return generate_scenes(600, seed=3)


def object_count(captions: tuple[str, ...]) -> int:
    """Number of objects, read from the inventory caption ("a picture of <count> ...")."""
    match = re.match(r"a picture of (one|two|three) ", captions[2])
    assert match, captions
    return COUNT_WORDS[match.group(1)]


def test_same_seed_is_identical_and_different_seeds_differ(scenes):
    again = generate_scenes(600, seed=3)
    assert again.images.tobytes() == scenes.images.tobytes()
    assert again.captions == scenes.captions and again.image_ids == scenes.image_ids
    np.testing.assert_array_equal(again.labels, scenes.labels)
    other = generate_scenes(600, seed=4)
    assert not np.array_equal(other.images, scenes.images)
    assert other.captions != scenes.captions


def test_shorter_run_is_a_prefix(scenes):
    head = generate_scenes(300, seed=3)  # crosses a layout-block boundary at 256
    assert head.images.tobytes() == scenes.images[:300].tobytes()
    assert head.captions == scenes.captions[:300]


def test_shapes_dtypes_and_ids(scenes):
    assert scenes.images.shape == (600, 64, 64, 3) and scenes.images.dtype == np.uint8
    assert scenes.image_ids[:2] == ["syn-3-0", "syn-3-1"]
    assert scenes.labels.dtype == np.int64 and set(scenes.labels) <= set(range(len(SHAPES)))
    small = generate_scenes(5, seed=0, image_size=32, label_attribute="colour")
    assert small.images.shape == (5, 32, 32, 3)
    assert set(small.labels) <= set(range(len(COLOURS)))


def test_one_to_three_objects_and_varied_captions(scenes):
    counts = [object_count(c) for c in scenes.captions]
    assert set(counts) == {1, 2, 3}
    for caps in scenes.captions:
        assert len(caps) >= 4 and len(set(caps)) >= 3
        assert all(c == c.lower() for c in caps)


def test_words_are_in_the_fixed_vocabulary(scenes):
    vocab = synthetic_vocabulary()
    emitted = {w for caps in scenes.captions for c in caps for w in tokenize(c)}
    assert emitted <= set(vocab.itos)
    assert {*SHAPES, *COLOURS, "small", "large", "above", "below"} <= set(vocab.itos)
    assert synthetic_vocabulary() == vocab  # built from templates, not from any seed's data
    assert vocab.itos[4:] == sorted(vocab.itos[4:])


def test_captions_describe_the_image(scenes):
    by_colour = generate_scenes(300, seed=11, label_attribute="colour")
    palette = list(COLOURS.items())
    for image, caps, label in zip(by_colour.images, by_colour.captions, by_colour.labels):
        name, rgb = palette[label]
        assert caps[0].split()[2] == name  # "a <size> <colour> <shape> ..." names the primary object first
        assert (image == rgb).all(axis=-1).sum() >= 9
        mentioned = {w for c in caps for w in c.split() if w in COLOURS}
        for other, other_rgb in palette:  # colours absent from every caption are absent from the image
            if other not in mentioned:
                assert not (image == other_rgb).all(axis=-1).any()
    for caps, label in zip(scenes.captions, scenes.labels):
        assert caps[0].split()[3] == SHAPES[label]


def test_single_object_size_and_position():
    data = generate_scenes(400, seed=5)
    checked = 0
    for image, caps in zip(data.images, data.captions):
        if object_count(caps) != 1:
            continue
        _, size, colour, _, *position = caps[0].split()
        ys, xs = np.nonzero((image == COLOURS[colour]).all(axis=-1))
        assert (len(ys) > 90) == (size == "large")
        third = 64 / 3
        row, col = int(ys.mean() // third), int(xs.mean() // third)
        expected_row = "top" if "top" in position else "bottom" if "bottom" in position else "middle"
        expected_col = "left" if "left" in position else "right" if "right" in position else "middle"
        assert ("top", "middle", "bottom")[row] == expected_row, caps[0]
        assert ("left", "middle", "right")[col] == expected_col, caps[0]
        checked += 1
    assert checked > 50


def test_embedded_splits_are_fixed_and_disjoint():
    splits = {name: load_embedded(name, 300 if name == "train" else None) for name in SPLITS}
    assert len(splits["val"]) == SPLITS["val"] and len(splits["test"]) == SPLITS["test"]
    ids = [set(s.image_ids) for s in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    hashes = [{im.tobytes() for im in s.images} for s in splits.values()]
    assert not (hashes[0] & hashes[1] or hashes[0] & hashes[2] or hashes[1] & hashes[2])
    assert load_embedded("val").captions == splits["val"].captions
    assert load_embedded("val", seed=1).captions != splits["val"].captions


@pytest.mark.parametrize("call, message", [
    (lambda: generate_scenes(0, seed=0), "n must be >= 1, got 0"),
    (lambda: generate_scenes(2, seed=-1), "got -1"),
    (lambda: generate_scenes(2, seed=0, image_size=8), "got 8"),
    (lambda: generate_scenes(2, seed=0, label_attribute="size"), "'shape', 'colour'"),
    (lambda: load_embedded("dev"), "'train', 'val', 'test'"),
    (lambda: apply_feature_skew(np.zeros((1, 4, 4, 3), np.uint8), kind="sepia", strength=0.5, seed=0), "sepia"),
    (lambda: apply_feature_skew(np.zeros((1, 4, 4, 3), np.uint8), kind="noise", strength=1.5, seed=0), "1.5"),
    (lambda: apply_feature_skew(np.zeros((4, 4, 3), np.uint8), kind="noise", strength=0.5, seed=0), "(4, 4, 3)"),
    (lambda: site_feature_skews(0, seed=0), "num_sites must be >= 1, got 0"),
])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_wrong_types_raise():
    with pytest.raises(TypeError):
        generate_scenes(2.0, seed=0)
    with pytest.raises(TypeError):
        apply_feature_skew(np.zeros((1, 4, 4, 3), np.float32), kind="none", strength=0.0, seed=0)


@pytest.mark.parametrize("kind", SKEW_KINDS)
def test_feature_skew(scenes, kind):
    images = scenes.images[:40]
    out = apply_feature_skew(images, kind=kind, strength=0.6, seed=7)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, apply_feature_skew(images, kind=kind, strength=0.6, seed=7))
    np.testing.assert_array_equal(apply_feature_skew(images, kind=kind, strength=0.0, seed=7), images)
    if kind == "none":
        np.testing.assert_array_equal(out, images)
        assert out is not images
    else:
        assert not np.array_equal(out, images)
    if kind == "blur":  # an averaging filter keeps the range and lowers the contrast
        assert out.min() >= images.min() and out.max() <= images.max()
        assert np.abs(np.diff(out.astype(int), axis=2)).mean() < np.abs(np.diff(images.astype(int), axis=2)).mean()
    if kind == "noise":
        assert not np.array_equal(out, apply_feature_skew(images, kind=kind, strength=0.6, seed=8))


def test_site_feature_skews():
    profiles = site_feature_skews(7, seed=0)
    assert len(profiles) == 7 and profiles[0] == {"kind": "none", "strength": 0.0}
    assert {p["kind"] for p in profiles[1:]} == set(SKEW_KINDS[1:])
    assert all(0.3 <= p["strength"] <= 0.8 for p in profiles[1:])
    assert site_feature_skews(7, seed=0) == profiles
