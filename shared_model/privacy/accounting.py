"""Epsilon from DP-SGD events, by accountants FedCap does not implement itself.

Privacy unit: one record (an image with its captions) of one site's dataset; neighbouring
datasets differ by adding or removing one record (add/remove relation, as in Opacus and
dp_accounting's ADD_OR_REMOVE_ONE).

Mechanism: a `DPSGDEvent` is `steps` Poisson-sampled Gaussian mechanisms, each sampling every
record independently with probability `sample_rate` and adding Gaussian noise of standard
deviation `noise_multiplier` x the clipping norm to the clipped gradient sum. In dp_accounting
terms: SelfComposedDpEvent(PoissonSampledDpEvent(sample_rate, GaussianDpEvent(noise_multiplier)),
steps). The clipping norm itself does not change epsilon.

Accountants (all compose every event of a dataset's whole history):
  "prv"  Opacus PRV accountant (numerical, tight)
  "rdp"  Opacus RDP accountant (an upper bound, looser than PRV/PLD), converted at the best order
         of Opacus's grid for each history
  "rdp@A"  the same RDP curve at the one order A, converted there: what a site's Rényi filter
         enforces (a filter is proved at one order fixed in advance; `filter_order`)
  "pld"  Google dp_accounting privacy-loss-distribution accountant (numerical, tight)
  "dp-rdp"  Google dp_accounting RDP accountant
Opacus's GDP accountant under-reports epsilon for these mechanisms and is not offered.

A plain Gaussian release over the whole dataset (the private vocabulary round) is the same event
with sample_rate 1 and one step (`gaussian_event`), composed with the DP-SGD events by the same
accountants.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

ACCOUNTANTS = ("prv", "rdp", "pld", "dp-rdp")
OPACUS_ACCOUNTANTS = ACCOUNTANTS[:2]  # the ones an Opacus PrivacyEngine can attach to an optimizer
# What a site enforces with when it names none (node_config; pyproject's `accountant` for simulated
# sites is the same, held by tests/test_run_settings.py): RDP, whose filter is sound for adaptive runs.
DEFAULT_ACCOUNTANT = "rdp"


def check_accountant(name: str, allowed: Sequence[str] = ACCOUNTANTS) -> str:
    """`name` if it is one of `allowed` or "rdp@A" (A > 1, a fixed Rényi order); else ValueError."""
    if name in allowed:
        return name
    if isinstance(name, str) and name.startswith("rdp@"):
        try:
            if float(name[4:]) > 1:
                return name
        except ValueError:
            pass
    raise ValueError(f"accountant must be one of {tuple(allowed)} or 'rdp@ORDER' (ORDER > 1), got {name!r}")


@lru_cache(maxsize=64)
def filter_order(target_epsilon: float, target_delta: float) -> float:
    """The Rényi order at which a site with budget (target_epsilon, target_delta) enforces its
    filter: the order of Opacus's grid that is best for a reference DP-SGD plan (Poisson rate 0.05,
    500 steps) calibrated to exactly that budget. It depends on the budget alone, so it is fixed
    before the site's first mechanism, as the Rényi filter theorem requires (docs/privacy.md; what it
    costs in noise against the best order chosen after the fact: docs/results.md)."""
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = RDPAccountant.DEFAULT_ALPHAS

    def spent(sigma: float) -> tuple[float, float]:  # (epsilon, best order) of the reference plan
        rdp = analysis.compute_rdp(q=0.05, noise_multiplier=sigma, steps=500, orders=orders)
        return analysis.get_privacy_spent(orders=orders, rdp=np.asarray(rdp), delta=target_delta)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        sigma = smallest_noise(lambda s: spent(s)[0], target_epsilon, what="the reference plan (rate 0.05, 500 steps)")
        _, order = spent(sigma)
    return float(order)


@dataclass(frozen=True, kw_only=True)
class DPSGDEvent:
    """`steps` Poisson-sampled Gaussian steps with one (sample_rate, noise_multiplier)."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if not (isinstance(self.sample_rate, (int, float)) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a finite number > 0, got {self.noise_multiplier!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")

    def to_dp_event(self):
        """The same mechanism as a dp_accounting DpEvent (sampling at rate 1 is no sampling: the
        Gaussian mechanism itself, composed `steps` times)."""
        import dp_accounting

        if self.sample_rate == 1:
            return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(self.noise_multiplier), self.steps)
        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)),
            self.steps)


def gaussian_event(*, noise_multiplier: float) -> DPSGDEvent:
    """One Gaussian mechanism over the whole dataset, noise standard deviation `noise_multiplier` x
    its L2 sensitivity (e.g. the private vocabulary release, vocab_release.py): a DPSGDEvent that
    samples every record (sample_rate 1, one step), which every accountant here treats as the plain
    Gaussian mechanism (dp_accounting: GaussianDpEvent(noise_multiplier)), so it composes with the
    DP-SGD events of a record's history through the same signatures and caches."""
    return DPSGDEvent(sample_rate=1.0, noise_multiplier=noise_multiplier, steps=1)


Signature = tuple[tuple[float, float, int], ...]  # sorted (sample_rate, noise_multiplier, steps), merged


def signature(events: Iterable[DPSGDEvent]) -> Signature:
    """The composition of `events` with one entry per (sample_rate, noise_multiplier), steps summed,
    sorted: composition is commutative and k + m self-compositions are k + m steps, so every
    accountant gives the same epsilon for equal signatures (and a cache can key on them)."""
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        if not isinstance(e, DPSGDEvent):
            raise TypeError(f"events must be DPSGDEvent, got {type(e).__name__}")
        if e.steps > 0:
            key = (float(e.sample_rate), float(e.noise_multiplier))
            steps[key] = steps.get(key, 0) + e.steps
    return tuple((q, s, n) for (q, s), n in sorted(steps.items()))


def add_to_signature(sig: Signature, event: DPSGDEvent) -> Signature:
    """`sig` composed with one more event, without revisiting the history."""
    if event.steps == 0:
        return sig
    key, merged = (float(event.sample_rate), float(event.noise_multiplier)), dict(((q, s), n) for q, s, n in sig)
    merged[key] = merged.get(key, 0) + event.steps
    return tuple((q, s, n) for (q, s), n in sorted(merged.items()))


def dominates(a: Signature, b: Signature) -> bool:
    """Every mechanism of `b` is in `a` with at least as many steps: epsilon(a) >= epsilon(b) for
    every accountant (composing more never lowers epsilon)."""
    steps = {(q, s): n for q, s, n in a}
    return all(steps.get((q, s), 0) >= n for q, s, n in b)


def merge_events(events: Iterable[DPSGDEvent]) -> tuple[DPSGDEvent, ...]:
    """`signature(events)` as DPSGDEvents."""
    return tuple(DPSGDEvent(sample_rate=q, noise_multiplier=s, steps=n) for q, s, n in signature(events))


def compute_epsilon(events: Iterable[DPSGDEvent], *, target_delta: float, accountant: str) -> float:
    """Epsilon at `target_delta` of the composition of all `events` (0.0 for none)."""
    return signature_epsilon(signature(events), target_delta=target_delta, accountant=accountant)


def signature_epsilon(sig: Signature, *, target_delta: float, accountant: str) -> float:
    """Epsilon at `target_delta` of the composition a signature stands for (0.0 for none)."""
    check_accountant(accountant)
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
    return _epsilon(tuple(sig), float(target_delta), accountant)


@lru_cache(maxsize=8192)
def _epsilon(sig: Signature, delta: float, accountant: str) -> float:
    # a pure function of a merged signature: per-record histories and audit prefixes repeat
    if not sig:
        return 0.0
    events = [DPSGDEvent(sample_rate=q, noise_multiplier=s, steps=n) for q, s, n in sig]
    if accountant.startswith("rdp@"):
        return _opacus_rdp_epsilon(events, delta, orders=(float(accountant[4:]),))
    if accountant in ("prv", "rdp"):
        return _opacus_epsilon(events, delta, accountant)
    return _dp_accounting_epsilon(events, delta, accountant)


def _opacus_epsilon(events: Sequence[DPSGDEvent], delta: float, name: str) -> float:
    if name == "rdp":
        return _opacus_rdp_epsilon(events, delta)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    with warnings.catch_warnings():  # sample_rate 1 (a Gaussian release): log(1 - q) = -inf, handled by numpy
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        return float(acc.get_epsilon(delta=delta))


def _opacus_rdp_epsilon(events: Sequence[DPSGDEvent], delta: float, orders: tuple[float, ...] | None = None
                        ) -> float:
    """What Opacus's RDPAccountant.get_epsilon computes, with its orders (or the given ones) and its
    conversion, but with the per-step RDP curve of each (sample_rate, noise_multiplier) computed
    once: RDP composes linearly in steps, so a long ledger's prefixes cost one vector sum each."""
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = tuple(RDPAccountant.DEFAULT_ALPHAS) if orders is None else orders
    total = sum(e.steps * _rdp_per_step(e.sample_rate, e.noise_multiplier, orders) for e in events)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = analysis.get_privacy_spent(orders=list(orders), rdp=np.atleast_1d(np.asarray(total)), delta=delta)
    return float(eps)


@lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]):
    from opacus.accountants.analysis import rdp as analysis

    return analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))


def _dp_accounting_epsilon(events: Sequence[DPSGDEvent], delta: float, name: str) -> float:
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    acc = PLDAccountant() if name == "pld" else RdpAccountant()
    for e in events:
        acc.compose(e.to_dp_event())
    return float(acc.get_epsilon(delta))


def rdp_at(events: Iterable[DPSGDEvent], order: float) -> float:
    """The Rényi divergence at `order` of the composition of `events` (Opacus's RDP analysis of the
    Poisson-sampled Gaussian, summed over steps: RDP composes additively at a fixed order)."""
    order = float(order)
    return float(sum(e.steps * float(_rdp_per_step(e.sample_rate, e.noise_multiplier, (order,))[0])
                     for e in merge_events(events)))


def conversion_cost(order: float, delta: float) -> float:
    """Opacus's RDP-to-(epsilon, delta) conversion at one order with nothing spent: the epsilon any
    mechanism's (order, r)-RDP adds r to (epsilon = r + conversion_cost(order, delta))."""
    return float(-(math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order))


def smallest_noise(cost: Callable[[float], float], target: float, *, what: str, max_noise: float = 1e3) -> float:
    """The smallest noise multiplier sigma (to 0.1% relative) with cost(sigma) <= target, for a cost
    that falls as sigma grows; ValueError naming `what` when none up to `max_noise` fits."""
    lo, hi = 0.05, 1.0
    while cost(hi) > target:
        lo, hi = hi, hi * 2
        if hi > max_noise:
            raise ValueError(f"no noise multiplier up to {max_noise:g} keeps {what} within {target:.4g}")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= target else (mid, hi)
    return hi


def calibrate_after(*, prior: Sequence[DPSGDEvent], sample_rate: float, steps: int, target_epsilon: float,
                    target_delta: float, accountant: str, max_noise: float = 1e3) -> float:
    """The smallest noise multiplier (to 0.1% relative) whose `steps` Poisson-sampled Gaussian steps
    at `sample_rate`, composed after the mechanisms `prior`, stay within (target_epsilon,
    target_delta) under `accountant`; ValueError when none up to `max_noise` fits."""
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    return smallest_noise(
        lambda sigma: compute_epsilon([*prior, DPSGDEvent(sample_rate=sample_rate, noise_multiplier=sigma,
                                                          steps=steps)], target_delta=target_delta,
                                      accountant=accountant),
        target_epsilon, max_noise=max_noise,
        what=f"{steps} steps at sample rate {sample_rate:.4g} after {len(list(prior))} earlier mechanism(s) at "
             f"delta {target_delta:g}")
