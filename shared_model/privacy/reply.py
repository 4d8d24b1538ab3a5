"""What a site's train reply reports beside its weights: the one list of its metric keys.

Every value is public (docs/privacy.md, "What a reply carries"): `num-examples` is a DP site's noisy
count (the run's count-gaussian release), `epsilon` the bound of a record that took part in every
event of the site's ledger, the rest follow from the run's grant and plan, which themselves follow
from public settings and the noisy count. No loss and no exact count is sent. A site without a
budget reports epsilon inf, delta 0 and zeros (`TrainMetrics.non_private`), so every reply has the
same keys. The server refuses a reply whose keys differ from `TRAIN_METRICS` (server/update_checks.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class TrainMetrics:
    num_examples: int
    epsilon: float
    delta: float
    target_epsilon: float
    epsilon_remaining: float
    run_epsilon_granted: float
    run_epsilon_spent: float
    noise_multiplier: float
    sample_rate: float
    steps: int

    @classmethod
    def non_private(cls, num_examples: int) -> "TrainMetrics":
        return cls(num_examples=num_examples, epsilon=float("inf"), delta=0.0, target_epsilon=0.0,
                   epsilon_remaining=0.0, run_epsilon_granted=0.0, run_epsilon_spent=0.0, noise_multiplier=0.0,
                   sample_rate=0.0, steps=0)

    def as_metrics(self) -> dict[str, int | float]:
        """The MetricRecord content: kebab-case keys, as Flower's records name things."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


TRAIN_METRICS = tuple(f.name.replace("_", "-") for f in fields(TrainMetrics))
# The keys about a site's budget, shown in the run summary as the site reported them.
BUDGET_METRICS = TRAIN_METRICS[TRAIN_METRICS.index("epsilon"):TRAIN_METRICS.index("run-epsilon-spent") + 1]
