"""Where the randomness of a DP mechanism comes from (no Flower).

The guarantee of DP-SGD holds only if the party it protects against cannot predict the Poisson
sample or the noise. At a deployed site that party is the server, and everything in a train
message is the server's choice, so no message value may seed anything: every generator is seeded
with 63 bits read from the operating system's entropy source (`os.urandom`), once per round. A
simulation (and `fedcap train --dp --seed N`) seeds from the run's settings instead, so that a run
is reproducible; that is for experiments, never for a release (docs/privacy.md, "Randomness").

torch's generators are Mersenne Twister (CPU) and Philox (CUDA), not cryptographic generators:
their outputs are never released raw here (the noise is added to gradients the server does not
know), and the 63-bit secret seed is out of reach of a search. Opacus's own secure_mode would use
torchcsprng's /dev/urandom generator, which no supported torch release ships; its other part, the
noise drawn as a sum of Gaussians against floating-point attacks, is on (dp.make_private).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def secret_seed() -> int:
    """63 bits from the OS's entropy source: a seed no message can influence or predict."""
    return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)


@dataclass
class MechanismRandomness:
    """The generators of one round: Poisson sampling (CPU) and noise (on `device`); torch's global
    generator (dropout, shuffles) is seeded too."""

    sampling: object
    noise: object
    seeded: bool  # True: reproducible from settings (simulation); False: OS entropy (deployment)


def mechanism_randomness(*, seed: int | None, device="cpu") -> MechanismRandomness:
    """`seed` None: every generator from `secret_seed()`; else seeded from `seed` (reproducible)."""
    import torch

    seeds = [secret_seed() for _ in range(3)] if seed is None else [seed, seed + 1, seed + 2]
    torch.manual_seed(seeds[0])
    sampling = torch.Generator(device="cpu")
    sampling.manual_seed(seeds[1])
    noise = torch.Generator(device=torch.device(device))
    noise.manual_seed(seeds[2])
    return MechanismRandomness(sampling=sampling, noise=noise, seeded=seed is not None)


def gaussian(sigma: float, *, seed: int | None) -> float:
    """One N(0, sigma^2) draw (a count release): from the OS's entropy when `seed` is None."""
    import random

    rng = random.SystemRandom() if seed is None else random.Random(seed)
    return rng.gauss(0.0, sigma)
