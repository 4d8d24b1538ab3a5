"""A site's budget, enforced per record, and the plan of one DP-SGD round (no Flower, no torch).

Privacy unit: one record at one site, add/remove neighbours. The site owns a lifetime budget
(target_epsilon, target_delta) for every record, enforced by an individual privacy filter
(Feldman and Zrnic 2021): before each round, every record's epsilon after this round's mechanism
is projected from its own history (individual.py); records whose projection would exceed the
budget are *retired* (left out before Poisson sampling, so they are not in the sampled-from set
and the round reveals nothing more about them), and the sample rate is computed over the records
that remain. Because retiring changes the sample rate (fewer records, a higher rate), the plan is
iterated to a fixed point. Fewer than `min_records` left refuses the round (BudgetExhaustedError).

A run spends an allowance, not the lifetime: at a run's first round the site grants
min(requested run epsilon, its own per-run cap, lifetime budget - the least-spent record's epsilon),
the first two less what the run's private vocabulary release cost by itself (vocab_release.py),
and calibrates the noise multiplier so that the whole run plan (rounds x local epochs of Poisson
batches) costs a record that trains in every round at most the grant; the grant (with that noise
multiplier) is written to the ledger and reused by every round of the run.

Accountant: the filter's guarantee holds for adaptively chosen mechanisms for Rényi DP, so the
default enforcing accountant is Opacus's RDP ("rdp"); "prv" is tighter but its composition theorem
assumes mechanisms fixed in advance (docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .accounting import OPACUS_ACCOUNTANTS, DPSGDEvent, compute_epsilon
from .dp import calibrate_noise_multiplier, poisson_plan
from .individual import RecordHistories, projected_epsilons
from .ledger import BudgetExhaustedError


@dataclass(frozen=True, kw_only=True)
class SiteBudget:
    """What only the site sets: its lifetime budget per record and how it enforces it."""

    target_epsilon: float
    target_delta: float
    accountant: str = "rdp"
    max_run_epsilon: float | None = None  # the site's own cap on one run's allowance
    min_records: int = 1
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # fixed noise instead of calibrating to the grant

    def __post_init__(self) -> None:
        if not (isinstance(self.target_epsilon, (int, float)) and math.isfinite(self.target_epsilon)
                and self.target_epsilon > 0):
            raise ValueError(f"target-epsilon must be a finite number > 0, got {self.target_epsilon!r}")
        if not (isinstance(self.target_delta, (int, float)) and 0 < self.target_delta < 1):
            raise ValueError(f"target-delta must be in (0, 1), got {self.target_delta!r}")
        if self.accountant not in OPACUS_ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {OPACUS_ACCOUNTANTS}, got {self.accountant!r}")
        if self.max_run_epsilon is not None and not self.max_run_epsilon > 0:
            raise ValueError(f"max-run-epsilon must be > 0, got {self.max_run_epsilon!r}")
        if not (isinstance(self.min_records, int) and self.min_records >= 1):
            raise ValueError(f"min-records must be an int >= 1, got {self.min_records!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max-grad-norm must be > 0, got {self.max_grad_norm!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise-multiplier must be > 0, got {self.noise_multiplier!r}")

    def check_delta(self, num_records: int) -> None:
        """A delta above 1/n allows mechanisms that publish a record outright with probability delta."""
        if num_records > 0 and self.target_delta > 1.0 / num_records:
            raise ValueError(f"target-delta {self.target_delta:g} is above 1/(number of records) = "
                             f"{1.0 / num_records:.3g}: with delta that large a mechanism may publish one record "
                             f"in full and still be (epsilon, delta)-DP; choose delta well below 1/{num_records}")


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """What the server asks for (never the budget itself)."""

    run_id: str
    run_epsilon: float
    num_rounds: int
    local_epochs: int
    batch_size: int
    init_checkpoint: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.run_epsilon, (int, float)) and self.run_epsilon > 0):
            raise ValueError(f"run-epsilon must be a number > 0, got {self.run_epsilon!r}")
        for name in ("num_rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class RoundPlan:
    event: DPSGDEvent
    train_ids: list[str]             # the records this round samples from
    retired: int                     # current records left out: their budget would be exceeded
    epsilon_after: float             # max epsilon over every current record after the round
    grant: dict[str, Any]            # the run's grant line (new or from the ledger)
    new_grant: bool
    spent_before: float              # max epsilon over current records before the round
    epsilon_trained: float           # max epsilon over the records this round trains, after it


def plan_round(*, histories: RecordHistories, grant: dict[str, Any] | None, record_ids: Sequence[str],
               budget: SiteBudget, request: RunRequest, server_round: int, spent_in_run: float = 0.0) -> RoundPlan:
    """This round's mechanism and the records it may use. Raises BudgetExhaustedError when the
    run gets no allowance, asks for a round beyond its granted plan, or fewer than
    `budget.min_records` records can train. `spent_in_run`: what this run already spent before its
    first round (its private vocabulary release, by itself), taken off the run's allowance."""
    delta, acc = budget.target_delta, budget.accountant
    by_group = histories.groups_of(record_ids)
    spent = {g: (histories.epsilon(g, target_delta=delta, accountant=acc) if g >= 0 else 0.0) for g in by_group}
    spent_max = max(spent.values(), default=0.0)
    new_grant = grant is None
    if new_grant:
        grant = _grant(spent, by_group, budget=budget, request=request, spent_in_run=spent_in_run)
    elif server_round > grant["num_rounds"]:
        raise BudgetExhaustedError(
            spent=spent_max, projected=spent_max, target_epsilon=budget.target_epsilon, target_delta=delta,
            reason=f"run {request.run_id} was granted epsilon {grant['granted_epsilon']:g} for "
                   f"{grant['num_rounds']} round(s); round {server_round} is beyond that plan")
    active = {g for g in by_group if spent[g] < budget.target_epsilon}
    while True:
        n = sum(len(by_group[g]) for g in active)
        if n < budget.min_records:
            raise BudgetExhaustedError(
                spent=spent_max, projected=spent_max, target_epsilon=budget.target_epsilon, target_delta=delta,
                reason=f"privacy budget exhausted: only {n} of {len(record_ids)} records can train without "
                       f"exceeding target_epsilon {budget.target_epsilon} (delta {delta:g}); min-records is "
                       f"{budget.min_records}. Spent: up to {spent_max:.4f}")
        q, steps = poisson_plan(num_records=n, batch_size=request.batch_size, epochs=request.local_epochs)
        event = DPSGDEvent(sample_rate=q, noise_multiplier=grant["noise_multiplier"], steps=steps)
        projected = projected_epsilons(histories, sorted(active), event, target_delta=delta, accountant=acc)
        over = {g for g, eps in projected.items() if eps > budget.target_epsilon}
        if not over:
            break
        active -= over  # a higher sample rate for the rest: plan again
    train_ids = [rid for g in sorted(active) for rid in by_group[g]]
    retired = len(record_ids) - len(train_ids)
    after = max([*projected.values(), *(spent[g] for g in by_group if g not in active)], default=0.0)
    return RoundPlan(event=event, train_ids=train_ids, retired=retired, epsilon_after=after, grant=grant,
                     new_grant=new_grant, spent_before=spent_max, epsilon_trained=max(projected.values()))


def _grant(spent: dict[int, float], by_group: dict[int, list[str]], *, budget: SiteBudget,
           request: RunRequest, spent_in_run: float = 0.0) -> dict[str, Any]:
    """The run's allowance and the noise multiplier calibrated to it over the whole run plan; the
    run's own earlier spending (its vocabulary release) comes off the run caps."""
    least_spent = min(spent.values(), default=0.0)
    caps = [request.run_epsilon - spent_in_run, budget.target_epsilon - least_spent]
    if budget.max_run_epsilon is not None:
        caps.append(budget.max_run_epsilon - spent_in_run)
    granted = min(caps)
    n = sum(len(v) for v in by_group.values())
    # the records expected to train the whole run set the planned sample rate: those whose spending
    # leaves room for the grant (the filter retires the others, which raises the rate)
    eligible = sum(len(by_group[g]) for g in by_group if spent[g] + granted <= budget.target_epsilon + 1e-9) or n
    if granted <= 1e-9 or n == 0:
        raise BudgetExhaustedError(spent=max(spent.values(), default=0.0), projected=least_spent,
                                   target_epsilon=budget.target_epsilon, target_delta=budget.target_delta,
                                   reason=f"privacy budget exhausted: no allowance left for run {request.run_id} "
                                          f"(least-spent record at epsilon {least_spent:.4f} of "
                                          f"{budget.target_epsilon}, {n} records)")
    q, steps = poisson_plan(num_records=eligible, batch_size=request.batch_size, epochs=request.local_epochs)
    planned_steps = steps * request.num_rounds
    try:
        noise = budget.noise_multiplier or calibrate_noise_multiplier(
            target_epsilon=granted, target_delta=budget.target_delta, sample_rate=q, steps=planned_steps,
            accountant=budget.accountant)
    except ValueError as e:  # Opacus: "The privacy budget is too low."
        raise BudgetExhaustedError(spent=max(spent.values(), default=0.0), projected=least_spent,
                                   target_epsilon=budget.target_epsilon, target_delta=budget.target_delta,
                                   reason=f"privacy budget exhausted: the allowance left for run {request.run_id}, "
                                          f"epsilon {granted:.4g}, is too small for any noise level over "
                                          f"{planned_steps} steps ({e})") from None
    return {"kind": "grant", "run_id": str(request.run_id), "requested_epsilon": float(request.run_epsilon),
            "granted_epsilon": float(granted), "noise_multiplier": float(noise), "sample_rate": float(q),
            "planned_steps": int(planned_steps), "num_rounds": int(request.num_rounds),
            "local_epochs": int(request.local_epochs), "batch_size": int(request.batch_size), "records": int(n),
            "spent_before": float(max(spent.values(), default=0.0)), "target_epsilon": float(budget.target_epsilon),
            "target_delta": float(budget.target_delta), "accountant": budget.accountant,
            "init_checkpoint": request.init_checkpoint}


def run_epsilon_alone(grant: dict[str, Any]) -> float:
    """What the grant's plan costs a record that trains in every round, by itself (for reports)."""
    event = DPSGDEvent(sample_rate=grant["sample_rate"], noise_multiplier=grant["noise_multiplier"],
                       steps=grant["planned_steps"])
    return compute_epsilon([event], target_delta=grant["target_delta"], accountant=grant["accountant"])
