"""A site's budget, enforced per record, and the plan of a run and of its rounds (no Flower, no torch).

Privacy unit: one record at one site, add/remove neighbours. The site owns a lifetime budget
(target_epsilon, target_delta) for every record, enforced by an individual privacy filter
(Feldman and Zrnic 2021): before each mechanism, every record's epsilon after it is projected from
its own history (individual.py); records whose projection would exceed the budget are *retired*
(left out before Poisson sampling, so they are not in the sampled-from set and the mechanism
reveals nothing more about them).

Nothing that decides a mechanism, or leaves the site, depends on the private data except through a
mechanism that is accounted: the number of records is itself released once per run, as a Gaussian
count (sensitivity 1, `count_noise_multiplier`, charged to every record it counted: a
"count-gaussian" ledger line), and the run's sample rate, steps per round, noise multiplier and the
reply's num-examples are computed from that noisy count and public settings only. The rate stays
fixed for the run: records added later join at it, retired records leave the expected batch
smaller; no exact count (records trained, retired, held) is ever sent.

A run spends an allowance: at a run's first round, after the count, the site grants
min(requested run epsilon, its own max-run-epsilon, its lifetime budget), all public, and calibrates
the noise multiplier so that everything the run does (its vocabulary releases, its count, then
rounds x local epochs of Poisson steps) spends at most the grant, in lifetime terms (`run_spend`),
and a record in every earlier mechanism of the ledger stays within the budget (`make_grant`); the
grant line is written to the ledger and reused by every round. The site enforces it itself, whatever the server sends: a round number outside
1..num_rounds or already trained for the run is refused, and before every round the run's spend
after it is projected and refused if it would pass the grant (a noise multiplier the server sets is
therefore only taken when the whole run plan fits the grant with it).

Accountant: the filter's guarantee holds for adaptively chosen mechanisms for Rényi DP, so the
default enforcing accountant is Opacus's RDP ("rdp"); "prv" is tighter but its composition theorem
assumes mechanisms fixed in advance (docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from shared_model.privacy.accounting import (DEFAULT_ACCOUNTANT, OPACUS_ACCOUNTANTS, DPSGDEvent, calibrate_after,
                                             check_accountant, compute_epsilon, conversion_cost, filter_order,
                                             gaussian_event, rdp_at, smallest_noise)
from shared_model.privacy.dp import poisson_plan
from shared_model.privacy.individual import RecordHistories, conversion_delta, projected_epsilons


class BudgetExhaustedError(RuntimeError):
    """Too few records can train this round without exceeding the site's privacy budget."""

    def __init__(self, *, spent: float, projected: float, target_epsilon: float, target_delta: float,
                 reason: str = "") -> None:
        self.spent, self.projected, self.target_epsilon, self.target_delta = spent, projected, target_epsilon, target_delta
        self.ledger_head: tuple[str, int] | None = None  # (hash, lines) of the ledger that refused, for the witness
        super().__init__(reason or f"privacy budget exhausted: epsilon spent {spent:.4f}, after this round "
                                   f"{projected:.4f} > target_epsilon {target_epsilon} (delta {target_delta:g})")


@dataclass(frozen=True, kw_only=True)
class SiteBudget:
    """What only the site sets: its lifetime budget per record and how it enforces it."""

    target_epsilon: float
    target_delta: float
    accountant: str = DEFAULT_ACCOUNTANT
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
        check_accountant(self.accountant, OPACUS_ACCOUNTANTS)
        if self.max_run_epsilon is not None and not self.max_run_epsilon > 0:
            raise ValueError(f"max-run-epsilon must be > 0, got {self.max_run_epsilon!r}")
        if not (isinstance(self.min_records, int) and self.min_records >= 1):
            raise ValueError(f"min-records must be an int >= 1, got {self.min_records!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max-grad-norm must be > 0, got {self.max_grad_norm!r}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"noise-multiplier must be > 0, got {self.noise_multiplier!r}")

    @property
    def enforcing(self) -> str:
        """The accountant the site's filter enforces with: for "rdp", RDP at the one order
        `filter_order(target_epsilon, target_delta)` fixed by the budget before any mechanism (the
        Rényi filter theorem holds at one order fixed in advance); "prv" as it is (tighter, but its
        composition assumes mechanisms fixed in advance: docs/privacy.md)."""
        if self.accountant == "rdp":
            return f"rdp@{filter_order(self.target_epsilon, self.target_delta):g}"
        return self.accountant

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
    count_noise_multiplier: float
    init_checkpoint: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.run_epsilon, (int, float)) and self.run_epsilon > 0):
            raise ValueError(f"run-epsilon must be a number > 0, got {self.run_epsilon!r}")
        if not (isinstance(self.count_noise_multiplier, (int, float)) and math.isfinite(self.count_noise_multiplier)
                and self.count_noise_multiplier > 0):
            raise ValueError(f"count-noise-multiplier must be a finite number > 0, got {self.count_noise_multiplier!r}")
        for name in ("num_rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class CountRelease:
    members: list[str]     # the records counted (those that can afford the count)
    noisy_count: float     # len(members) + N(0, count_noise_multiplier^2)
    epsilon: float         # the largest epsilon among `members` after the count


@dataclass
class RoundPlan:
    event: DPSGDEvent
    train_ids: list[str]             # the records this round samples from
    retired: int                     # current records left out: their budget would be exceeded
    epsilon_trained: float           # max epsilon over the records this round trains, after it
    run_epsilon_after: float         # the run's spend after this round (a record in all of the run)


def _refuse(budget: SiteBudget, reason: str, spent: float = 0.0) -> BudgetExhaustedError:
    return BudgetExhaustedError(spent=spent, projected=spent, target_epsilon=budget.target_epsilon,
                                target_delta=budget.target_delta, reason=reason)


def release_count(*, histories: RecordHistories, record_ids: Sequence[str], budget: SiteBudget,
                  request: RunRequest, gauss: Callable[[float], float]) -> CountRelease:
    """The run's count: the records whose epsilon after one Gaussian release (sensitivity 1) stays
    within budget are counted, and their number plus `gauss(sigma)` is released (`gauss` draws
    N(0, sigma^2) from the site's generator). The caller writes it to the ledger before it is used."""
    members, epsilon = admitted(histories, record_ids, gaussian_event(noise_multiplier=request.count_noise_multiplier),
                                budget)
    return CountRelease(members=sorted(members), noisy_count=len(members) + gauss(request.count_noise_multiplier),
                        epsilon=epsilon)


def run_spend(events: Sequence[DPSGDEvent], *, accountant: str, target_epsilon: float, target_delta: float,
              extra_delta: float = 0.0) -> float:
    """What a run's mechanisms (`events`) spend of a site's lifetime budget, in epsilon units.

    Under the Rényi filter (accountant "rdp@A") a record's lifetime epsilon is r + c, with r its
    Rényi divergence at A (additive over everything it took part in) and c = conversion_cost(A,
    delta) paid once; the lifetime's Rényi budget is B = target_epsilon - c. A run's spend is its
    Rényi divergence as a share of B, in epsilon units: r_run x target_epsilon / B. Shares add up,
    so runs whose grants sum to target_epsilon fill the budget exactly, and a run granted g moves
    every record that took part in an earlier mechanism by at most g x B / target_epsilon <= g (a
    record's first mechanism also pays c). Other accountants: the run's own epsilon. Infinite when
    the thresholding deltas (`extra_delta`) leave no conversion delta."""
    delta = conversion_delta(target_delta, extra_delta)
    if delta is None:
        return math.inf
    if accountant.startswith("rdp@"):
        order = float(accountant[4:])
        room = target_epsilon - conversion_cost(order, delta)
        return math.inf if room <= 0 else rdp_at(events, order) * target_epsilon / room
    return compute_epsilon(events, target_delta=delta, accountant=accountant)


def _spend(events: Sequence[DPSGDEvent], budget: SiteBudget, extra_delta: float) -> float:
    return run_spend(events, accountant=budget.enforcing, target_epsilon=budget.target_epsilon,
                     target_delta=budget.target_delta, extra_delta=extra_delta)


def run_plan(noisy_count: float, *, batch_size: int, local_epochs: int) -> tuple[float, int, int]:
    """(sample_rate, steps per round, records the plan assumes) from the noisy count: dp.poisson_plan
    (Opacus's convention) for n = the rounded noisy count (at least 1). The audit checks every grant
    against this rule (run_audit.py)."""
    n = max(1, int(round(noisy_count)))
    rate, steps = poisson_plan(num_records=n, batch_size=batch_size, epochs=local_epochs)
    return rate, steps, n


def make_grant(*, noisy_count: float, prior: Sequence[DPSGDEvent], prior_extra_delta: float, budget: SiteBudget,
               request: RunRequest, history: Sequence[DPSGDEvent] = (), history_extra_delta: float = 0.0
               ) -> dict[str, Any]:
    """The run's grant line: the allowance g = min(run-epsilon, max-run-epsilon, target-epsilon)
    and the smallest noise multiplier with which
      (a) the run alone, `prior` (its vocabulary releases and count) and every planned step, costs
          at most g: a record new to this run moves by at most g; and
      (b) a record that took part in every earlier mechanism of the ledger (`history`, public: a
          bound on every record's) and in the whole run stays within target-epsilon, as long as
          that record has budget left: the grant is in lifetime terms, so a site's last run fills
          its budget instead of leaving it nearly unspent;
    or a fixed noise multiplier (the run config's), refused unless it satisfies (a). BudgetExhaustedError
    when the noisy count is below min-records or nothing fits."""
    granted = min(request.run_epsilon, budget.target_epsilon,
                  *([budget.max_run_epsilon] if budget.max_run_epsilon is not None else []))
    q, steps_per_round, n = run_plan(noisy_count, batch_size=request.batch_size, local_epochs=request.local_epochs)
    planned_steps = steps_per_round * request.num_rounds
    acc = budget.enforcing
    delta = conversion_delta(budget.target_delta, prior_extra_delta)
    if noisy_count < budget.min_records:
        raise _refuse(budget, f"privacy budget exhausted or too few records: the run's noisy count of the records "
                              f"that can still train is {noisy_count:.1f}, below min-records {budget.min_records}")
    if delta is None:
        raise _refuse(budget, f"the run's vocabulary releases spent the whole target-delta {budget.target_delta:g}")
    def spend(sigma: float) -> float:
        return _spend([*prior, DPSGDEvent(sample_rate=q, noise_multiplier=sigma, steps=planned_steps)], budget,
                      prior_extra_delta)

    if budget.noise_multiplier is not None:
        noise = budget.noise_multiplier
        if (cost := spend(noise)) > granted * (1 + 1e-9):
            raise _refuse(budget, f"noise-multiplier {noise:g} set by the run config would spend epsilon {cost:.4g} "
                                  f"over run {request.run_id}'s plan ({planned_steps} steps at sample rate {q:.4g}), "
                                  f"more than the {granted:.4g} this site grants; the site refuses it (set "
                                  f"noise-multiplier = 0 to let the site calibrate)")
    else:
        try:
            noise = smallest_noise(spend, granted, what=f"run {request.run_id}'s spend")
            full = conversion_delta(budget.target_delta, prior_extra_delta + history_extra_delta)
            if history and full is not None and compute_epsilon(
                    [*history, *prior], target_delta=full, accountant=acc) < budget.target_epsilon:
                noise = max(noise, calibrate_after(prior=[*history, *prior], sample_rate=q, steps=planned_steps,
                                                   target_epsilon=budget.target_epsilon, target_delta=full,
                                                   accountant=acc))
        except ValueError as e:
            raise _refuse(budget, f"privacy budget exhausted: the allowance for run {request.run_id}, epsilon "
                                  f"{granted:.4g}, is too small for any noise level over {planned_steps} steps ({e})"
                          ) from None
    return {"kind": "grant", "run_id": str(request.run_id), "requested_epsilon": float(request.run_epsilon),
            "granted_epsilon": float(granted), "noise_multiplier": float(noise), "sample_rate": float(q),
            "planned_steps": int(planned_steps), "num_rounds": int(request.num_rounds),
            "local_epochs": int(request.local_epochs), "batch_size": int(request.batch_size), "records": int(n),
            "spent_before": float(_spend(prior, budget, prior_extra_delta)),
            "target_epsilon": float(budget.target_epsilon), "target_delta": float(budget.target_delta),
            "accountant": acc, "init_checkpoint": request.init_checkpoint}


def plan_round(*, histories: RecordHistories, grant: dict[str, Any], record_ids: Sequence[str], budget: SiteBudget,
               server_round: int, run_events: Sequence[DPSGDEvent], run_extra_delta: float,
               trained_rounds: Sequence[int]) -> RoundPlan:
    """This round's mechanism (the grant's rate and noise, its steps per round) and the records it
    may use. BudgetExhaustedError when the round number is outside the plan or already trained in
    this run, when the run's spend after it would pass the grant, or when no record can train."""
    num_rounds, run_id = int(grant["num_rounds"]), grant["run_id"]
    if not 1 <= server_round <= num_rounds:
        raise _refuse(budget, f"run {run_id} was granted epsilon {grant['granted_epsilon']:g} for {num_rounds} "
                              f"round(s); round {server_round} is outside that plan")
    if server_round in trained_rounds or len(trained_rounds) >= num_rounds:
        raise _refuse(budget, f"run {run_id}: round {server_round} asked again (this site trained rounds "
                              f"{sorted(trained_rounds)} of {num_rounds}); a round is trained once")
    event = DPSGDEvent(sample_rate=grant["sample_rate"], noise_multiplier=grant["noise_multiplier"],
                       steps=int(grant["planned_steps"]) // num_rounds)
    run_after = _spend([*run_events, event], budget, run_extra_delta)
    if run_after > grant["granted_epsilon"] * (1 + 1e-6):
        raise _refuse(budget, f"run {run_id}: round {server_round} would bring the run's spend to epsilon "
                              f"{run_after:.4g}, past its grant of {grant['granted_epsilon']:.4g}")
    train_ids, epsilon_trained = admitted(histories, record_ids, event, budget)
    if not train_ids:
        raise _refuse(budget, f"privacy budget exhausted: none of this site's records can train round {server_round} "
                              f"of run {run_id} without exceeding target_epsilon {budget.target_epsilon} (delta "
                              f"{budget.target_delta:g})", spent_so_far(histories, record_ids, budget))
    return RoundPlan(event=event, train_ids=train_ids, retired=len(record_ids) - len(train_ids),
                     epsilon_trained=epsilon_trained, run_epsilon_after=run_after)


def admitted(histories: RecordHistories, record_ids: Sequence[str], event: DPSGDEvent, budget: SiteBudget, *,
             extra_delta: float = 0.0) -> tuple[list[str], float]:
    """The individual filter, the one rule every mechanism of a site passes (a training round, a
    vocabulary release): the records of `record_ids` whose epsilon after `event` (plus `extra_delta`
    beyond the accountant's delta) stays within target_epsilon under the enforcing accountant, and
    the largest such epsilon (0.0 when none). The others are retired from this mechanism: they take
    no part in it, so it costs them nothing (individual.py; Feldman & Zrnic 2021)."""
    by_group = histories.groups_of(record_ids)
    projected = projected_epsilons(histories, sorted(by_group), event, target_delta=budget.target_delta,
                                   accountant=budget.enforcing, extra_delta=extra_delta)
    active = sorted(g for g, eps in projected.items() if eps <= budget.target_epsilon)
    return [rid for g in active for rid in by_group[g]], max((projected[g] for g in active), default=0.0)


def spent_so_far(histories: RecordHistories, record_ids: Sequence[str], budget: SiteBudget) -> float:
    """The largest epsilon any record of `record_ids` has spent (what a refusal reports)."""
    return max((histories.epsilon(g, target_delta=budget.target_delta, accountant=budget.enforcing)
                for g in histories.groups_of(record_ids) if g >= 0), default=0.0)


def public_epsilon(events: Sequence[DPSGDEvent], extra_delta: float, budget: SiteBudget) -> float:
    """The epsilon of a record that took part in every one of `events` (all a ledger's mechanisms):
    an upper bound on every record's, computed from the mechanisms alone. This, not any record's own
    figure, is what a reply reports."""
    delta = conversion_delta(budget.target_delta, extra_delta)
    return math.inf if delta is None else compute_epsilon(events, target_delta=delta, accountant=budget.enforcing)


def run_epsilon_alone(grant: dict[str, Any]) -> float:
    """What the grant's DP-SGD plan costs a record that trains in every round, by itself (for reports)."""
    event = DPSGDEvent(sample_rate=grant["sample_rate"], noise_multiplier=grant["noise_multiplier"],
                       steps=grant["planned_steps"])
    return compute_epsilon([event], target_delta=grant["target_delta"], accountant=grant["accountant"])
