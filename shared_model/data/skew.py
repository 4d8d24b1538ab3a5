"""Feature skew for non-IID federations: each site sees its images through its own "camera".

A skew is a kind and a strength in [0, 1] (0 leaves images unchanged):
  none         identity
  colour_cast  per-channel gains 1 + strength * u, u ~ U(-0.5, 0.5)^3, one cast per seed (a white balance)
  noise        additive Gaussian noise, standard deviation 50 * strength grey levels (a noisy sensor)
  blur         separable Gaussian filter, sigma 2 * strength pixels, edges replicated (a soft lens)
Images are uint8 [N, H, W, 3] in and out; the same seed gives the same output.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .checks import check_int

SKEW_KINDS = ("none", "colour_cast", "noise", "blur")
_MAX_NOISE_STD = 50.0
_MAX_BLUR_SIGMA = 2.0
_CHUNK = 256  # images processed at a time, to bound float32 temporaries
_SITE_STRENGTHS = (0.3, 0.8)  # range of strengths that site_feature_skews draws from



def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(f"images must be a uint8 numpy array, got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {tuple(images.shape)}")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _chunked(images: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    out = np.empty_like(images)
    for start in range(0, len(images), _CHUNK):
        out[start:start + _CHUNK] = _to_uint8(fn(images[start:start + _CHUNK].astype(np.float32)))
    return out


def _blur_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Convolve x along `axis` with a symmetric 1-D kernel, replicating the edges."""
    radius = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="edge")
    length = x.shape[axis]
    out = np.zeros_like(x)
    for offset, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(offset, offset + length), axis=axis)
    return out


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def apply_feature_skew(images: np.ndarray, *, kind: str, strength: float, seed: int) -> np.ndarray:
    """A skewed copy of images (uint8 [N, H, W, 3]); deterministic for a seed."""
    _check_images(images)
    if kind not in SKEW_KINDS:
        raise ValueError(f"kind must be one of {SKEW_KINDS}, got {kind!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)):
        raise TypeError(f"strength must be a number, got {type(strength).__name__}")
    if not 0.0 <= strength <= 1.0:  # also rejects nan
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    check_int("seed", seed, 0)
    if kind == "none" or strength == 0:
        return images.copy()
    rng = np.random.default_rng(seed)
    if kind == "colour_cast":
        gains = (1.0 + strength * rng.uniform(-0.5, 0.5, 3)).astype(np.float32)
        return _chunked(images, lambda x: x * gains)
    if kind == "noise":
        std = np.float32(_MAX_NOISE_STD * strength)
        return _chunked(images, lambda x: x + std * rng.standard_normal(x.shape, dtype=np.float32))
    kernel = _gaussian_kernel(_MAX_BLUR_SIGMA * strength)
    return _chunked(images, lambda x: _blur_axis(_blur_axis(x, kernel, 1), kernel, 2))


def site_feature_skews(num_sites: int, *, seed: int) -> list[dict]:
    """One {"kind", "strength"} profile per site: site 0 is unskewed, the others cycle the
    skew kinds in a seeded order with strengths drawn from [0.3, 0.8] (two decimals)."""
    check_int("num_sites", num_sites, 1)
    check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    kinds = [SKEW_KINDS[1:][i] for i in rng.permutation(len(SKEW_KINDS) - 1)]
    profiles = [{"kind": "none", "strength": 0.0}]
    for site in range(1, num_sites):
        strength = round(float(rng.uniform(*_SITE_STRENGTHS)), 2)
        profiles.append({"kind": kinds[(site - 1) % len(kinds)], "strength": strength})
    return profiles
