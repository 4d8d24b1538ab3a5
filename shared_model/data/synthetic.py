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

Worlds (which content a population shows)
    A ``World`` names the shapes and colours a population draws, how often each occurs, and the
    share of images on a light background (style: "on a light background" in caption 4). The
    ``EMBEDDED`` world is the grammar above, drawn uniformly, always dark: the default data.
    The ``SHIFTED`` world (``data-scenario = "shifted"``) is a site domain with content of its own,
    as a shop's or a hospital's images have beside a public web corpus: two more shapes (star,
    ring: 44% of its objects), two more colours (orange, pink: 40%) and half its images on a light
    background. Its public counterpart (public.py, ``SHIFTED_PUBLIC``) shows star, orange and light
    backgrounds rarely and ring and pink never. Each world draws from its own seed stream
    (``split_seed``), so the embedded splits keep their seeds and bytes.

``synthetic_vocabulary(scenario)`` holds every word the templates and the scenario's word lists can
emit: the domain's terminology, built from the grammar rather than from captions, so it reveals
nothing about any site's data, and it covers words the public set never shows.
Output depends only on the seed (numpy's PCG64 stream, IEEE arithmetic), and
``generate_scenes(m, seed=s)`` is a prefix of ``generate_scenes(n, seed=s)`` for m <= n.
"""

from __future__ import annotations

import re
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
DOMAIN_SHAPES = ("star", "ring")  # the shifted scenario's own content (SHIFTED)
DOMAIN_COLOURS: dict[str, tuple[int, int, int]] = {"orange": (245, 130, 20), "pink": (250, 120, 180)}
BACKGROUNDS = ("dark", "light")
LABEL_ATTRIBUTES = ("shape", "colour")
SPLITS = {"train": 4000, "val": 500, "test": 500}  # default size of each embedded split
MIN_IMAGE_SIZE = 32

_RGB = {name: np.array(rgb, dtype=np.uint8) for name, rgb in {**COLOURS, **DOMAIN_COLOURS}.items()}
_RADIUS = (0.22, 0.36)  # object half-extent for small / large, as a fraction of the cell width
_MAX_BACKGROUND = 40
_LIGHT_BACKGROUND = (150, 190)  # channel range of a light background: white objects stay visible
_RING_HOLE = 0.55  # inner radius of a ring, as a fraction of its outer radius
_STAR_INNER = 0.45  # inner vertices of a five-pointed star, as a fraction of its tips' radius
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
    "single_background": "a {size} {colour} {shape} on a {background} background",
    "relation": "{subject} {relation} {reference}",
    "relation_and": "{relation} and {placed}",
    "there_are": "there are {count} shapes, {listing}",
    "picture_many": "a picture of {count} shapes, {listing}",
}
_AN = re.compile(r"\ba (?=[aeiou])")  # "a orange" -> "an orange"
_SINGLE = ("single_position", "single_there", "single_picture", "single_background")


class World(NamedTuple):
    """The content of a population of scenes. Weights None: uniform (the embedded draws)."""
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = tuple(COLOURS)
    shape_weights: tuple[float, ...] | None = None
    colour_weights: tuple[float, ...] | None = None
    light_background: float = 0.0  # share of images on a light background
    stream: int = 0  # seed-stream word; 0: the embedded seeds

    @property
    def backgrounds(self) -> tuple[str, ...]:
        return BACKGROUNDS if self.light_background > 0 else BACKGROUNDS[:1]

    @property
    def articles(self) -> tuple[str, ...]:
        """("an",) when a word that can follow the article starts with a vowel (orange), else ()."""
        return ("an",) if any(w[0] in "aeiou" for w in (*self.colours, *SIZES, *self.backgrounds)) else ()


def mix(common: int, rare: tuple[float, ...]) -> tuple[float, ...]:
    """Weights of `common` equally frequent values followed by values with the given `rare` rates."""
    return (*(((1.0 - sum(rare)) / common,) * common), *rare)


EMBEDDED = World()
SHIFTED = World(shapes=SHAPES + DOMAIN_SHAPES, colours=(*COLOURS, *DOMAIN_COLOURS),
                shape_weights=mix(len(SHAPES), (0.22, 0.22)), colour_weights=mix(len(COLOURS), (0.2, 0.2)),
                light_background=0.5, stream=21)
WORLDS = {"embedded": EMBEDDED, "shifted": SHIFTED}  # the private data of each run-config data-scenario
SCENARIOS = tuple(WORLDS)


def world_of(scenario: str) -> World:
    """The private world of a data scenario (SCENARIOS)."""
    if scenario not in WORLDS:
        raise ValueError(f"data scenario must be one of {SCENARIOS}, got {scenario!r}")
    return WORLDS[scenario]


class _Object(NamedTuple):
    shape: str
    colour: str
    size: int
    row: int
    col: int


def _phrase(obj: _Object, form: str, background: str = BACKGROUNDS[0]) -> str:
    """One object's words filled into the template `form`."""
    short, long = _POSITIONS[obj.row, obj.col]
    return _TEMPLATES[form].format(size=SIZES[obj.size], colour=obj.colour, shape=obj.shape,
                                   position=short, position_long=long, background=background)


def _relation(a: _Object, b: _Object) -> str:
    """Where a lies relative to b; cells differ, and a column difference takes precedence."""
    if a.col != b.col:
        return _RELATIONS[0] if a.col < b.col else _RELATIONS[1]
    return _RELATIONS[2] if a.row < b.row else _RELATIONS[3]


def _listing(phrases: list[str]) -> str:
    return _TEMPLATES["listing"].format(items=", ".join(phrases[:-1]), last=phrases[-1])


def _captions(objects: list[_Object], background: str) -> tuple[str, ...]:
    t = _TEMPLATES
    first, last = objects[0], objects[-1]
    if len(objects) == 1:
        return tuple(_phrase(first, form, background) for form in _SINGLE)
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
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (_RING_HOLE * r) ** 2)
    if shape == "star":
        return _inside_polygon(_STAR * r, dx, dy)
    return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))  # cross


def _star(points: int = 5) -> np.ndarray:
    """Vertices [2 * points, 2] (x, y; y down) of a star of tip radius 1, a tip at the top."""
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, _STAR_INNER)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_STAR = _star()


def _inside_polygon(vertices: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Even-odd rule: points (dx [1, w], dy [h, 1]) inside the polygon `vertices` [k, 2]."""
    inside = np.zeros(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, 1, axis=0)):
        if y0 == y1:  # a horizontal edge never crosses a horizontal ray
            continue
        crosses = (y0 > dy) != (y1 > dy)
        inside ^= crosses & (dx < (x1 - x0) * (dy - y0) / (y1 - y0) + x0)
    return inside


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
    image[y0:y1, x0:x1][_shape_mask(obj.shape, dx, dy, r)] = _RGB[obj.colour]


def _indices(rng: np.random.Generator, k: int, weights: tuple[float, ...] | None, size: tuple[int, ...]
             ) -> np.ndarray:
    """Draws of 0..k-1: uniform as the embedded generator always drew them, else with `weights`."""
    if weights is None:
        return rng.integers(0, k, size)
    return rng.choice(k, size=size, p=np.asarray(weights) / sum(weights))


def generate_scenes(n: int, *, seed: int, image_size: int = 64, label_attribute: str = "shape",
                    world: World = EMBEDDED) -> CaptionSet:
    """n seeded scenes of `world` with four captions each; labels are the primary object's shape or
    colour index in the world's lists."""
    n = check_int("n", n, 1)
    seed = check_int("seed", seed, 0)
    image_size = check_int("image_size", image_size, MIN_IMAGE_SIZE)
    if label_attribute not in LABEL_ATTRIBUTES:
        raise ValueError(f"label_attribute must be one of {LABEL_ATTRIBUTES}, got {label_attribute!r}")
    rng = np.random.default_rng(seed)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions: list[tuple[str, ...]] = []
    labels = np.empty(n, dtype=np.int64)
    articles = world.articles
    for start in range(0, n, _BLOCK):
        counts = rng.integers(1, _MAX_OBJECTS + 1, _BLOCK)
        shapes = _indices(rng, len(world.shapes), world.shape_weights, (_BLOCK, _MAX_OBJECTS))
        colours = _indices(rng, len(world.colours), world.colour_weights, (_BLOCK, _MAX_OBJECTS))
        sizes = rng.integers(0, len(SIZES), (_BLOCK, _MAX_OBJECTS))
        cells = np.argsort(rng.random((_BLOCK, 9)), axis=1, kind="stable")[:, :_MAX_OBJECTS]  # distinct
        jitter = rng.uniform(-1.0, 1.0, (_BLOCK, _MAX_OBJECTS, 2))
        background = rng.integers(0, _MAX_BACKGROUND + 1, (_BLOCK, 3), dtype=np.uint8)
        light = np.zeros(_BLOCK, dtype=bool)
        if world.light_background > 0:  # drawn only then: the embedded stream stays as it was
            light = rng.random(_BLOCK) < world.light_background
            tint = rng.integers(_LIGHT_BACKGROUND[0], _LIGHT_BACKGROUND[1] + 1, (_BLOCK, 3), dtype=np.uint8)
            background = np.where(light[:, None], tint, background)
        for j in range(min(_BLOCK, n - start)):
            image = images[start + j]
            image[:] = background[j]
            objects = [_Object(world.shapes[shapes[j, k]], world.colours[colours[j, k]], int(sizes[j, k]),
                               *divmod(int(cells[j, k]), 3)) for k in range(counts[j])]
            for k, obj in enumerate(objects):
                _draw(image, obj, jitter[j, k])
            caps = _captions(objects, BACKGROUNDS[int(light[j])])
            captions.append(tuple(_AN.sub("an ", c) for c in caps) if articles else caps)
            labels[start + j] = shapes[j, 0] if label_attribute == "shape" else colours[j, 0]
    return CaptionSet(images=images, captions=captions, image_ids=[f"syn-{seed}-{i}" for i in range(n)],
                      labels=labels)


def split_seed(split: str, seed: int = 0, scenario: str = "embedded") -> int:
    """The generator seed of an embedded split: distinct per (split, seed, scenario), far from small
    user seeds; the embedded scenario's are SeedSequence((seed, 0|1|2)) as they always were."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    seed = check_int("seed", seed, 0)
    stream = world_of(scenario).stream
    entropy = (seed, list(SPLITS).index(split), *((stream,) if stream else ()))
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def load_embedded(split: str, n: int | None = None, *, seed: int = 0, image_size: int = 64,
                  scenario: str = "embedded") -> CaptionSet:
    """A fixed split ("train", "val" or "test") of a scenario's private data; n defaults to the
    split's size."""
    derived = split_seed(split, seed, scenario)
    return generate_scenes(SPLITS[split] if n is None else n, seed=derived, image_size=image_size,
                           world=world_of(scenario))


def synthetic_vocabulary(scenario: str = "embedded") -> Vocabulary:
    """Every word a scenario's scenes can emit, from its world's word lists and the templates, sorted
    (the shifted scenario's covers its public population too: that shows a subset of its content)."""
    world = world_of(scenario)
    words = {*world.shapes, *world.colours, *world.backgrounds, *world.articles, *SIZES, *_COUNTS}
    phrases = [*_RELATIONS, *(p for pair in _POSITIONS.values() for p in pair)]
    phrases += [literal for template in _TEMPLATES.values() for literal, *_ in Formatter().parse(template)]
    words.update(w for phrase in phrases for w in tokenize(phrase))
    return Vocabulary(sorted(words))
