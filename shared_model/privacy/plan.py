"""What a site's DP rounds will look like, from public quantities only, before any budget is spent.

For a site of n records (a number the server learns anyway, from `num-examples`) and the run's
settings, the site's run plan is the one its grant will make (site_budget.make_grant, with the
run's count release as its only earlier mechanism and the count taken at its expected value):
the Poisson rate q = 1/ceil(n / batch-size), the steps, and the noise multiplier sigma calibrated
to the allowance. Each step adds Gaussian noise of standard deviation sigma x max-grad-norm to
the sum of the clipped per-example gradients, and divides by the expected batch n x q; over the d
trainable parameters its L2 norm is about sigma x max-grad-norm x sqrt(d) / (n x q), while the
mean clipped gradient has norm at most max-grad-norm. Their ratio, sigma sqrt(d) / (n q), is the
noise-to-signal ratio of a step. Over a round's S steps the signal adds up coherently at best (S x)
and the independent noise as sqrt(S), so the run's ratio is the step's over sqrt(S x rounds): above
`NOISE_DOMINATES` (1: the noise is larger than the best the signal can do) the site's updates are
mostly noise. A heuristic, calibrated on two facts: the main job (ratio 0.84 per run) trains well;
three sites of 360 records with every parameter trainable (2.05) handed back a model worse than
its start (issue 21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared_model.privacy.accounting import gaussian_event
from shared_model.privacy.site_budget import RunRequest, SiteBudget, make_grant

NOISE_DOMINATES = 1.0  # the run's noise norm over the clipped signal's best
LEVERS = ("train fewer parameters (trainable = \"decoder\" or \"fusion+decoder\")", "a larger expected batch "
          "(batch-size) with as many records", "fewer steps (local-epochs, num-server-rounds)",
          "a larger run-epsilon")


@dataclass(frozen=True)
class SitePlan:
    records: int
    expected_batch: float
    steps_per_round: int
    steps: int
    noise_multiplier: float
    granted_epsilon: float
    noise_to_signal: float  # per step
    run_noise_to_signal: float  # over the whole run: the step's / sqrt(steps)

    @property
    def noise_dominates(self) -> bool:
        return self.run_noise_to_signal > NOISE_DOMINATES


def site_plan(*, records: int, request: RunRequest, budget: SiteBudget, trainable_parameters: int) -> SitePlan:
    """The plan of a site with `records` records (ValueError naming a bad value; BudgetExhaustedError
    when no noise fits the allowance)."""
    if not (isinstance(records, int) and records >= 1):
        raise ValueError(f"records must be an int >= 1, got {records!r}")
    if not (isinstance(trainable_parameters, int) and trainable_parameters >= 1):
        raise ValueError(f"trainable_parameters must be an int >= 1, got {trainable_parameters!r}")
    grant: dict[str, Any] = make_grant(noisy_count=float(records),
                                       prior=[gaussian_event(noise_multiplier=request.count_noise_multiplier)],
                                       prior_extra_delta=0.0, budget=budget, request=request)
    batch = grant["records"] * grant["sample_rate"]
    sigma = grant["noise_multiplier"]
    return SitePlan(records=records, expected_batch=batch, steps_per_round=grant["planned_steps"] // request.num_rounds,
                    steps=grant["planned_steps"], noise_multiplier=sigma, granted_epsilon=grant["granted_epsilon"],
                    noise_to_signal=sigma * math.sqrt(trainable_parameters) / batch,
                    run_noise_to_signal=sigma * math.sqrt(trainable_parameters) / batch / math.sqrt(grant["planned_steps"]))
