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
  "prv"  Opacus PRV accountant (numerical, tight; FedCap's default)
  "rdp"  Opacus RDP accountant (an upper bound, looser than PRV/PLD)
  "pld"  Google dp_accounting privacy-loss-distribution accountant (numerical, tight)
  "dp-rdp"  Google dp_accounting RDP accountant
Opacus's GDP accountant under-reports epsilon for these mechanisms and is not offered.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

ACCOUNTANTS = ("prv", "rdp", "pld", "dp-rdp")
OPACUS_ACCOUNTANTS = ACCOUNTANTS[:2]  # the ones an Opacus PrivacyEngine can attach to an optimizer


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
        """The same mechanism as a dp_accounting DpEvent."""
        import dp_accounting

        return dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)),
            self.steps)


def compute_epsilon(events: Iterable[DPSGDEvent], *, target_delta: float, accountant: str = "prv") -> float:
    """Epsilon at `target_delta` of the composition of all `events` (0.0 for none)."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
    events = [e for e in events if e.steps > 0]
    for e in events:
        if not isinstance(e, DPSGDEvent):
            raise TypeError(f"events must be DPSGDEvent, got {type(e).__name__}")
    if not events:
        return 0.0
    if accountant in ("prv", "rdp"):
        return _opacus_epsilon(events, target_delta, accountant)
    return _dp_accounting_epsilon(events, target_delta, accountant)


def _opacus_epsilon(events: Sequence[DPSGDEvent], delta: float, name: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if name == "prv" else RDPAccountant()
    acc.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(acc.get_epsilon(delta=delta))


def _dp_accounting_epsilon(events: Sequence[DPSGDEvent], delta: float, name: str) -> float:
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    acc = PLDAccountant() if name == "pld" else RdpAccountant()
    for e in events:
        acc.compose(e.to_dp_event())
    return float(acc.get_epsilon(delta))
