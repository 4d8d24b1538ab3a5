"""The embedded generator's PUBLIC variant: scenes for non-private pretraining.

The private data of a simulation is the embedded train split (and the server's test split) drawn
from `split_seed(split, seed)`. The public variant is a different population of the same world:
  - its own seed stream, `public_seed(seed)` = SeedSequence((seed, PUBLIC_STREAM)), an entropy tuple
    no private split uses (they use (seed, 0..2));
  - its own "camera": every image is blurred (Gaussian, sigma 1.6 px) then colour-cast (one fixed
    white balance), like a second site with a soft lens and another sensor. No private record is
    seen through this camera, so no public image equals a private one (an unskewed private image has
    sharp edges; the blur leaves none), which tests/test_pretraining.py checks for the default seeds.
The grammar is shared, so caption *sets* repeat across populations (as they do between the private
train and test splits: about a quarter of single-object scenes); the records never do.

In the shifted data scenario (`scenario="shifted"`, run-config data-scenario) the public population
also differs in *content*, as a web corpus differs from a site's own images: `SHIFTED_PUBLIC` draws
the embedded shapes and colours, a star or an orange object 1 time in 500, a light background 1 image
in 100, and never a ring or a pink object, while the sites and the server's test split (synthetic.py,
`SHIFTED`) show them often. It has its own seed stream too, (seed, PUBLIC_STREAM, SHIFTED.stream).

Pretraining on it is ordinary, non-private training: it touches no site's records and spends no
site privacy budget. Image ids are "pub-<seed>-<i>", distinct from the private "syn-..." ids.
"""

from __future__ import annotations

import numpy as np

from .checks import check_int
from .records import CaptionSet
from .skew import apply_feature_skew
from .synthetic import COLOURS, EMBEDDED, SHAPES, SHIFTED, World, generate_scenes, mix, world_of

PUBLIC_STREAM = 1_000_003  # the public variant's entropy word; private splits use 0, 1, 2
PUBLIC_CAMERA = (("blur", 0.8), ("colour_cast", 0.8))  # (skew kind, strength), applied in order
PUBLIC_SIZE = 20_000
# the web corpus of the shifted scenario: its extra content rarely (star, orange, light) or never (ring, pink)
SHIFTED_PUBLIC = SHIFTED._replace(shape_weights=mix(len(SHAPES), (0.002, 0.0)),
                                  colour_weights=mix(len(COLOURS), (0.002, 0.0)), light_background=0.01)
PUBLIC_WORLDS: dict[str, World] = {"embedded": EMBEDDED, "shifted": SHIFTED_PUBLIC}


def public_seed(seed: int = 0, scenario: str = "embedded") -> int:
    """The generator seed of the public variant for a user seed (never a private split's seed)."""
    seed = check_int("seed", seed, 0)
    stream = world_of(scenario).stream
    return int(np.random.SeedSequence((seed, PUBLIC_STREAM, *((stream,) if stream else ()))).generate_state(1)[0])


def public_camera(images: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Images seen through the public camera (blur, then a colour cast fixed by `seed`)."""
    for i, (kind, strength) in enumerate(PUBLIC_CAMERA):
        images = apply_feature_skew(images, kind=kind, strength=strength, seed=seed * 10 + i + 1)
    return images


def load_public(n: int = PUBLIC_SIZE, *, seed: int = 0, image_size: int = 64, scenario: str = "embedded"
                ) -> CaptionSet:
    """n public scenes of a data scenario (a prefix of a longer run with the same seed), through the
    public camera; ids "pub-<seed>-<i>" (embedded) or "pub-<scenario>-<seed>-<i>"."""
    n = check_int("n", n, 1)
    derived = public_seed(seed, scenario)
    scenes = generate_scenes(n, seed=derived, image_size=image_size, world=PUBLIC_WORLDS[scenario])
    prefix = "pub" if scenario == "embedded" else f"pub-{scenario}"
    return CaptionSet(images=public_camera(scenes.images, seed=seed), captions=scenes.captions,
                      image_ids=[f"{prefix}-{seed}-{i}" for i in range(n)], labels=scenes.labels)
