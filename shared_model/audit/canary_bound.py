"""The one-run privacy audit bound of Steinke, Nasr and Jagielski (NeurIPS 2023): pure math, no torch.

The experiment (docs/empirical-audit.md; canaries and their scoring: evaluation/canaries.py): m canary
records, each included in one site's training data by an independent fair coin S_i in {-1 (out),
+1 (in)}; one training run; the auditor scores every canary against the final model, guesses "in"
for the k+ lowest scores and "out" for the k- highest, abstains on the rest, and counts the correct
guesses W among the r = k+ + k- guesses.

Privacy unit and relation: one record at one site, add/remove (docs/privacy.md); a canary is such
a record, and the coins add or remove canaries independently of each other and of the run.

The bound (their Theorem 5.2 and the p-value algorithm of their appendix): if the training run is
(epsilon, delta)-DP in each canary, then for every v

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, q) >= v],  q = e^epsilon / (1 + e^epsilon).

With delta = 0 this is the binomial tail of epsilon-DP randomized response. The audit reports the
largest epsilon whose p-value for the observed W is at most alpha = 1 - confidence: a run that were
(epsilon, delta)-DP with a smaller epsilon would show that many correct guesses with probability at
most alpha. When several guess counts are tried, each is tested at alpha / K (Bonferroni), so the
best of them is still a (1 - alpha)-confidence lower bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shared_model.data.checks import check_int

DEFAULT_GUESS_FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # r / m tried, k+ = k- (one more + when odd)


# ---- the bound ---------------------------------------------------------------------------------

def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Upper bound on P[W >= v] for r guesses about m canaries under (epsilon, delta)-DP."""
    from scipy.stats import binom

    _check_counts(m, r, v)
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon!r}, {delta!r}")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))  # f(v)
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ..., P[Bin = 0]
    worst = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))  # max_i (f(v-i) - f(v)) / i
    return min(tail + 2 * m * delta * worst, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, alpha: float = 0.05, tol: float = 1e-7) -> float:
    """The largest epsilon that v correct guesses out of r reject at level alpha: the sup of
    {epsilon >= 0 : p_value(epsilon) <= alpha}, 0.0 when no epsilon is rejected."""
    _check_counts(m, r, v)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    pure = lambda eps: p_value(m=m, r=r, v=v, epsilon=eps, delta=0.0)  # noqa: E731  f(v), grows with epsilon
    if v == 0 or pure(0.0) > alpha:
        return 0.0  # p_value >= f(v) >= f(v) at epsilon 0 > alpha: nothing is rejected
    lo, hi = 0.0, 1.0
    while pure(hi) <= alpha:
        lo, hi = hi, 2 * hi
    eps_pure = _bisect(pure, lo, hi, alpha, tol)  # the delta = 0 bound; for v = r it is logit(alpha^(1/r))
    if delta == 0:
        return eps_pure
    # p_value = f(v) + delta term >= f(v), so every rejected epsilon is <= eps_pure; the delta term
    # need not be monotone in epsilon: take the largest rejected point of a fine grid, then bisect
    # between it and the next grid point
    full = lambda eps: p_value(m=m, r=r, v=v, epsilon=eps, delta=delta)  # noqa: E731
    grid = np.linspace(0.0, eps_pure, 201)
    rejected = np.flatnonzero([full(float(e)) <= alpha for e in grid])
    if len(rejected) == 0:
        return 0.0
    i = int(rejected[-1])
    return float(grid[i]) if i == len(grid) - 1 else _bisect(full, float(grid[i]), float(grid[i + 1]), alpha, tol)


def _bisect(fn, lo: float, hi: float, alpha: float, tol: float) -> float:
    """fn(lo) <= alpha < fn(hi) -> the crossing, from below."""
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) <= alpha else (lo, mid)
    return lo


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        check_int(name, value, 0)
    if not v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")


# ---- guesses and the audit ---------------------------------------------------------------------

@dataclass(frozen=True)
class GuessResult:
    k_plus: int
    k_minus: int
    correct: int
    epsilon_lower_bound: float  # at the Bonferroni-corrected level

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus


@dataclass(frozen=True)
class CanaryAuditResult:
    m: int
    delta: float
    confidence: float
    best: GuessResult
    tried: list[GuessResult] = field(default_factory=list)

    @property
    def epsilon_lower_bound(self) -> float:
        return self.best.epsilon_lower_bound


def guess_counts(m: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> list[tuple[int, int]]:
    """(k+, k-) pairs to try: r = round(fraction x m) guesses, split evenly (the extra one positive)."""
    m = check_int("m", m, 1)
    pairs = []
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"guess fractions must be in (0, 1], got {f!r}")
        r = max(1, round(f * m))
        pair = ((r + 1) // 2, r // 2)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def correct_guesses(scores: np.ndarray, included: np.ndarray, *, k_plus: int, k_minus: int) -> int:
    """Guess "in" for the k_plus lowest scores, "out" for the k_minus highest; count the correct ones."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores and included must be 1-d of one length, got {scores.shape} and {included.shape}")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores):
        raise ValueError(f"need k+, k- >= 0 and k+ + k- <= m = {len(scores)}, got {k_plus}, {k_minus}")
    order = np.argsort(scores, kind="stable")  # ascending: most member-like first
    positive, negative = order[:k_plus], order[len(order) - k_minus:] if k_minus else order[:0]
    return int(included[positive].sum() + (~included[negative]).sum())


def one_run_audit(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float = 0.95,
          pairs: Sequence[tuple[int, int]] | None = None) -> CanaryAuditResult:
    """Try every (k+, k-) in `pairs` (default: guess_counts(m)) at level (1 - confidence) / K each;
    the best bound is a `confidence` lower bound on the epsilon of an (epsilon, delta)-DP run."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    m = len(scores)
    pairs = list(pairs) if pairs is not None else guess_counts(m)
    if not pairs:
        raise ValueError("no guess counts to try")
    alpha = (1.0 - confidence) / len(pairs)
    tried = []
    for k_plus, k_minus in pairs:
        v = correct_guesses(scores, included, k_plus=k_plus, k_minus=k_minus)
        eps = epsilon_lower_bound(m=m, r=k_plus + k_minus, v=v, delta=delta, alpha=alpha)
        tried.append(GuessResult(k_plus, k_minus, v, eps))
    best = max(tried, key=lambda g: (g.epsilon_lower_bound, g.correct / g.guesses))
    return CanaryAuditResult(m=m, delta=delta, confidence=confidence, best=best, tried=tried)
