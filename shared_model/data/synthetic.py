"""The embedded default dataset: seeded synthetic scenes of coloured shapes, with captions.

Scene grammar
    An image (square, ``image_size`` pixels, 64 by default) is a plain dark background
    (a random dark tint, each channel 0..40) holding 1 to 3 objects. An object is a shape
    (circle, square, triangle, diamond, cross), a colour (red, green, blue, yellow,
    purple, white), a size (small, large) and a cell of a 3x3 grid. Objects sit in
    distinct cells, jittered inside their cell with a one-pixel margin, so they never
    touch. The first object is the *primary* one: its shape or colour is the label
    used for label-skew partitioning.

Captions
    Four reference captions per image, one per template family, all true:
      1. position or relation: "a small red circle on the left",
         "a small red circle to the left of a large blue square and a green cross at the top"
      2. listing with positions: "there is a red circle in the left part of the image",
         "there are two shapes, a red circle on the left and a blue square at the top right"
      3. inventory: "a picture of one small red circle",
         "a picture of two shapes, a small red circle and a large blue square"
      4. background or reverse relation: "a small red circle on a dark background",
         "a blue square to the right of a red circle" (last object against the first)
    Relations come from the grid cells: different columns give "to the left of" / "to
    the right of", the same column gives "above" / "below". Objects stay inside their
    cells, so a relation holds for the whole shapes, not only their centres.

``synthetic_vocabulary()`` holds every word the templates and word lists can emit.
Output depends only on the seed (numpy's PCG64 stream, IEEE arithmetic), and
``generate_scenes(m, seed=s)`` is a prefix of ``generate_scenes(n, seed=s)`` for m <= n.
"""

from __future__ import annotations

from string import Formatter
from typing import NamedTuple

import numpy as np

from .checks import check_int
from .records import CaptionSet
from .vocab import Vocabulary, tokenize

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SIZES = ("small", "large")
LABEL_ATTRIBUTES = ("shape", "colour")
SPLITS = {"train": 4000, "val": 500, "test": 500}  # default size of each embedded split
MIN_IMAGE_SIZE = 32

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.uint8)
_RADIUS = (0.22, 0.36)  # object half-extent for small / large, as a fraction of the cell width
_MAX_BACKGROUND = 40
_MAX_OBJECTS = 3
_BLOCK = 256  # layouts are drawn in fixed blocks, so shorter runs are prefixes of longer ones
_COUNTS = ("one", "two", "three")
_RELATIONS = ("to the left of", "to the right of", "above", "below")
# grid cell (row, col) -> (short position phrase, long position phrase)
_POSITIONS = {
    (0, 0): ("at the top left", "in the top left corner"),
    (0, 1): ("at the top", "in the upper part of the image"),
    (0, 2): ("at the top right", "in the top right corner"),
    (1, 0): ("on the left", "in the left part of the image"),
    (1, 1): ("in the centre", "in the middle of the image"),
    (1, 2): ("on the right", "in the right part of the image"),
    (2, 0): ("at the bottom left", "in the bottom left corner"),
    (2, 1): ("at the bottom", "in the lower part of the image"),
    (2, 2): ("at the bottom right", "in the bottom right corner"),
}
_TEMPLATES = {
    "full": "a {size} {colour} {shape}",
    "short": "a {colour} {shape}",
    "placed": "a {colour} {shape} {position}",
    "listing": "{items} and {last}",
    "single_position": "a {size} {colour} {shape} {position}",
    "single_there": "there is a {colour} {shape} {position_long}",
    "single_picture": "a picture of one {size} {colour} {shape}",
    "single_background": "a {size} {colour} {shape} on a dark background",
    "relation": "{subject} {relation} {reference}",
    "relation_and": "{relation} and {placed}",
    "there_are": "there are {count} shapes, {listing}",
    "picture_many": "a picture of {count} shapes, {listing}",
}
_SINGLE = ("single_position", "single_there", "single_picture", "single_background")


class _Object(NamedTuple):
    shape: int
    colour: int
    size: int
    row: int
    col: int



def _phrase(obj: _Object, form: str) -> str:
    """One object's words filled into the template `form`."""
    short, long = _POSITIONS[obj.row, obj.col]
    return _TEMPLATES[form].format(size=SIZES[obj.size], colour=_COLOUR_NAMES[obj.colour], shape=SHAPES[obj.shape],
                                   position=short, position_long=long)


def _relation(a: _Object, b: _Object) -> str:
    """Where a lies relative to b; cells differ, and a column difference takes precedence."""
    if a.col != b.col:
        return _RELATIONS[0] if a.col < b.col else _RELATIONS[1]
    return _RELATIONS[2] if a.row < b.row else _RELATIONS[3]


def _listing(phrases: list[str]) -> str:
    return _TEMPLATES["listing"].format(items=", ".join(phrases[:-1]), last=phrases[-1])


def _captions(objects: list[_Object]) -> tuple[str, ...]:
    t = _TEMPLATES
    first, last = objects[0], objects[-1]
    if len(objects) == 1:
        return tuple(_phrase(first, form) for form in _SINGLE)
    count = _COUNTS[len(objects) - 1]
    relation = t["relation"].format(subject=_phrase(first, "full"), relation=_relation(first, objects[1]),
                                    reference=_phrase(objects[1], "full"))
    if len(objects) == 3:
        relation = t["relation_and"].format(relation=relation, placed=_phrase(last, "placed"))
    return (
        relation,
        t["there_are"].format(count=count, listing=_listing([_phrase(o, "placed") for o in objects])),
        t["picture_many"].format(count=count, listing=_listing([_phrase(o, "full") for o in objects])),
        t["relation"].format(subject=_phrase(last, "short"), relation=_relation(last, first),
                             reference=_phrase(first, "short")),
    )


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Pixels of a shape of half-extent r; dx [1, w] and dy [h, 1] are offsets from its centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if shape == "triangle":  # apex up, base of width 2r at the bottom
        return (dy <= r) & (ax <= 0.5 * (dy + r))
    if shape == "diamond":
        return ax + ay <= r
    return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))  # cross


def _draw(image: np.ndarray, obj: _Object, jitter: np.ndarray) -> None:
    """Paint one object into image [S, S, 3] in place, inside its grid cell."""
    size = image.shape[0]
    cell = size / 3
    r = _RADIUS[obj.size] * cell
    slack = cell / 2 - r - 1.0  # keeps a one-pixel margin to the cell border
    cx = (obj.col + 0.5) * cell + jitter[0] * slack
    cy = (obj.row + 0.5) * cell + jitter[1] * slack
    x0, x1 = max(int(np.floor(cx - r)), 0), min(int(np.ceil(cx + r)) + 1, size)
    y0, y1 = max(int(np.floor(cy - r)), 0), min(int(np.ceil(cy + r)) + 1, size)
    dx = (np.arange(x0, x1) + 0.5 - cx)[None, :]  # pixel centres, [1, w]
    dy = (np.arange(y0, y1) + 0.5 - cy)[:, None]  # [h, 1]
    image[y0:y1, x0:x1][_shape_mask(SHAPES[obj.shape], dx, dy, r)] = _PALETTE[obj.colour]


def generate_scenes(n: int, *, seed: int, image_size: int = 64, label_attribute: str = "shape") -> CaptionSet:
    """n seeded scenes with four captions each; labels are the primary object's shape or colour index."""
    n = check_int("n", n, 1)
    seed = check_int("seed", seed, 0)
    image_size = check_int("image_size", image_size, MIN_IMAGE_SIZE)
    if label_attribute not in LABEL_ATTRIBUTES:
        raise ValueError(f"label_attribute must be one of {LABEL_ATTRIBUTES}, got {label_attribute!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions: list[tuple[str, ...]] = []
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, _BLOCK):
        counts = rng.integers(1, _MAX_OBJECTS + 1, _BLOCK)
        shapes = rng.integers(0, len(SHAPES), (_BLOCK, _MAX_OBJECTS))
        colours = rng.integers(0, len(COLOURS), (_BLOCK, _MAX_OBJECTS))
        sizes = rng.integers(0, len(SIZES), (_BLOCK, _MAX_OBJECTS))
        cells = np.argsort(rng.random((_BLOCK, 9)), axis=1, kind="stable")[:, :_MAX_OBJECTS]  # distinct
        jitter = rng.uniform(-1.0, 1.0, (_BLOCK, _MAX_OBJECTS, 2))
        background = rng.integers(0, _MAX_BACKGROUND + 1, (_BLOCK, 3), dtype=np.uint8)
        for j in range(min(_BLOCK, n - start)):
            image = images[start + j]
            image[:] = background[j]
            objects = [_Object(int(shapes[j, k]), int(colours[j, k]), int(sizes[j, k]), *divmod(int(cells[j, k]), 3))
                       for k in range(counts[j])]
            for k, obj in enumerate(objects):
                _draw(image, obj, jitter[j, k])
            captions.append(_captions(objects))
            labels[start + j] = objects[0].shape if label_attribute == "shape" else objects[0].colour
    return CaptionSet(images=images, captions=captions, image_ids=[f"syn-{seed}-{i}" for i in range(n)],
                      labels=labels)


def split_seed(split: str, seed: int = 0) -> int:
    """The generator seed of an embedded split: distinct per (split, seed), far from small user seeds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    seed = check_int("seed", seed, 0)
    return int(np.random.SeedSequence((seed, list(SPLITS).index(split))).generate_state(1)[0])


def load_embedded(split: str, n: int | None = None, *, seed: int = 0, image_size: int = 64) -> CaptionSet:
    """A fixed split of the embedded dataset ("train", "val" or "test"); n defaults to the split's size."""
    derived = split_seed(split, seed)
    return generate_scenes(SPLITS[split] if n is None else n, seed=derived, image_size=image_size)


def synthetic_vocabulary() -> Vocabulary:
    """Every word the generator can emit, from its word lists and templates, sorted."""
    words = {*SHAPES, *COLOURS, *SIZES, *_COUNTS}
    phrases = [*_RELATIONS, *(p for pair in _POSITIONS.values() for p in pair)]
    phrases += [literal for template in _TEMPLATES.values() for literal, *_ in Formatter().parse(template)]
    words.update(w for phrase in phrases for w in tokenize(phrase))
    return Vocabulary(sorted(words))
