"""Checks of one site's train reply against the global model, before any aggregation.

A reply is refused for that site only (the round goes on with the others) when:
- its arrays do not match the global model: missing or extra arrays, another shape, another dtype
  (the model's float32: a float64 or float16 reply would change the global model's dtype, a complex
  one crashes the mean), non-finite values;
- its update (reply minus global weights) has an L2 norm above `max-update-norm` (absolute; 0 = off)
  or above `max-update-norm-ratio` times the round's lower median update norm (relative; 0 = off).
  The lower median is an honest site's norm as long as fewer than half of the replies are
  poisoned; a single reply is its own median and always passes the relative bound;
- its MetricRecord does not hold exactly TRAIN_METRICS (shared_model/privacy/reply.py) (missing or extra keys), or a value is not
  a finite number;
- `num-examples` is not a positive integer or exceeds `max-num-examples`.
Then `capped_weights` bounds every site's aggregation weight by `examples-cap-ratio` times the
round's lower median num-examples, so no claimed dataset size hands one site the model.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from shared_model.privacy.reply import TRAIN_METRICS



class UpdateRejected(ValueError):
    """A reply that fails a check: `check` names it, `value` is what was found."""

    def __init__(self, check: str, value: object, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check, self.value = check, value


def check_arrays(arrays: ArrayRecord, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reply's arrays as numpy, or UpdateRejected naming the first bad array."""
    keys = set(arrays.keys())
    if keys != set(reference):
        missing, extra = sorted(set(reference) - keys), sorted(keys - set(reference))
        raise UpdateRejected("arrays", {"missing": missing[:3], "extra": extra[:3]},
                             f"missing arrays {missing[:3]} / unexpected arrays {extra[:3]}")
    out = {}
    for key, ref in reference.items():
        try:
            value = arrays[key].numpy()
        except Exception as e:  # an undecodable array is a malformed reply, not a server crash
            raise UpdateRejected("array", key, f"array {key!r} cannot be read: {e}") from None
        if value.dtype != ref.dtype:
            raise UpdateRejected("dtype", str(value.dtype),
                                 f"array {key!r} has dtype {value.dtype}, the model's is {ref.dtype}")
        if value.shape != ref.shape:
            raise UpdateRejected("shape", value.shape, f"array {key!r} has shape {value.shape}, expected {ref.shape}")
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            raise UpdateRejected("finite", key, f"array {key!r} has non-finite values")
        out[key] = value
    return out


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (reply - global) over the floating-point arrays, in float64."""
    total = 0.0
    for key, ref in reference.items():
        if ref.dtype.kind == "f":
            diff = arrays[key].astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def check_metrics(metrics: MetricRecord, *, max_num_examples: int, expected: tuple[str, ...] = TRAIN_METRICS
                  ) -> int:
    """num-examples of a reply whose MetricRecord holds exactly `expected`, or UpdateRejected."""
    keys = set(metrics.keys())
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        raise UpdateRejected("metric-keys", {"missing": missing, "extra": extra},
                             f"metrics missing {missing} / unexpected {extra}")
    for key in expected:
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UpdateRejected("metric", key, f"metric {key!r} must be a number, got {value!r}")
        if math.isnan(value) or (key != "epsilon" and math.isinf(value)):  # epsilon inf: a non-private site
            raise UpdateRejected("metric", key, f"metric {key!r} must be finite, got {value!r}")
    examples = metrics["num-examples"]
    if not float(examples).is_integer() or not 1 <= examples <= max_num_examples:
        raise UpdateRejected("num-examples", examples,
                             f"num-examples must be an integer in [1, max-num-examples = {max_num_examples}], "
                             f"got {examples!r}")
    return int(examples)


def lower_median(values: list[float]) -> float:
    """The lower of the two middle values (the middle one for an odd count)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def norm_violations(norms: Mapping[str, float], *, max_norm: float, max_ratio: float) -> dict[str, str]:
    """{reply key: reason} for the updates above the absolute or the relative norm bound."""
    bad = {}
    median = lower_median(list(norms.values())) if norms else 0.0
    for key, norm in norms.items():
        if max_norm > 0 and norm > max_norm:
            bad[key] = f"update norm {norm:.4g} > max-update-norm {max_norm:g}"
        elif max_ratio > 0 and median > 0 and norm > max_ratio * median:
            bad[key] = (f"update norm {norm:.4g} > max-update-norm-ratio {max_ratio:g} x the round's median "
                        f"update norm {median:.4g}")
        elif max_ratio > 0 and median == 0 and norm > 0 and len(norms) > 1:
            bad[key] = f"update norm {norm:.4g} while the round's median update norm is 0"
    return bad


def capped_weights(examples: Mapping[str, int], *, cap_ratio: float) -> dict[str, int]:
    """Each reply's aggregation weight: its num-examples, at most `cap_ratio` x the lower median."""
    if not examples:
        return {}
    cap = max(1, int(cap_ratio * lower_median([float(v) for v in examples.values()])))
    return {key: min(n, cap) for key, n in examples.items()}
