"""The private vocabulary release: DP word counts at one site, thresholded at the site (no Flower, no torch).

Privacy unit: one record (an image with all its captions) at one site; neighbouring datasets differ
by adding or removing one record (add/remove, as for DP-SGD).

Mechanism (Gaussian thresholding, the DP set-union / partition-selection release of Korolova et al.
2009, Gopi et al. 2020, Desfontaines et al. 2022):
  1. contribution bounding: each record contributes the set of distinct words of its captions
     (`tokenize`), each word at most once, and at most k = `max_words_per_record` of them (the
     words in most of its captions first, ties broken at random); so one record changes the count
     vector by a 0/1 vector of at most k ones: L2 sensitivity sqrt(k);
  2. Gaussian noise of standard deviation sigma = noise_multiplier x sqrt(k) on every word the site
     holds;
  3. thresholding at the site: only words whose noisy count exceeds
         tau = 1 + sigma * Phi^-1(1 - threshold_delta / k)
     leave the site (with their noisy counts). A word that only the added/removed record holds has
     count 1, so it crosses tau with probability threshold_delta / k; the record holds at most k
     such words, so the set of released words reveals it with probability <= threshold_delta.
The server only sums the sites' released counts (post-processing). Thresholding at the site, not
at the server, is what makes the set of words a site sends private: an unthresholded noisy
histogram would name every word the site holds.

Guarantee and accounting: on the words both neighbours hold, the release is the Gaussian mechanism
with noise multiplier `noise_multiplier` (accounting.gaussian_event: dp_accounting's
GaussianDpEvent), composed per record with its DP-SGD events by the site's accountant, exactly as
DP-SGD rounds are (individual.py, the site's filter in site_budget.py, the audit). The words only
the differing record holds add `threshold_delta` to delta: if the accountant reports (eps, delta)
for a record's whole history, the record's guarantee is (eps + sum ln(1/(1 - threshold_delta)),
delta + sum threshold_delta) over the vocabulary releases it was counted in (the ln term, from
conditioning on no such word being released, is about threshold_delta: 1e-7 for the default).
Delta therefore composes per record: the accountant converts a record's history at target_delta
minus the thresholding deltas of the releases it was counted in (individual.conversion_delta), so
a record's total delta never passes the site's target_delta, and a record with none left is
retired. A run's releases share the run's allowance with its training: each release is refused
when the run's spend with it (all of the run's mechanisms composed) would reach the run's caps.

Not protected beyond that: the released words and their noisy counts are public (every site
receives the vocabulary with the model); the number of records counted is in the ledger only.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Sequence

from shared_model.privacy.accounting import DPSGDEvent, gaussian_event
from shared_model.privacy.ledger import LedgerTransaction
from shared_model.privacy.site_budget import BudgetExhaustedError, SiteBudget, admitted, run_spend, spent_so_far


@dataclass(frozen=True, kw_only=True)
class VocabRelease:
    """What the server asks for: noise (relative to the L2 sensitivity sqrt(k)), the L0 bound k per
    record, and the thresholding delta."""

    noise_multiplier: float
    max_words_per_record: int
    threshold_delta: float

    def __post_init__(self) -> None:
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise ValueError(f"vocab-noise-multiplier must be a finite number > 0, got {self.noise_multiplier!r}")
        if not (isinstance(self.max_words_per_record, int) and not isinstance(self.max_words_per_record, bool)
                and self.max_words_per_record >= 1):
            raise ValueError(f"vocab-max-words-per-record must be an int >= 1, got {self.max_words_per_record!r}")
        if not (isinstance(self.threshold_delta, (int, float)) and 0 < self.threshold_delta < 1):
            raise ValueError(f"vocab-delta must be in (0, 1), got {self.threshold_delta!r}")

    @property
    def noise_std(self) -> float:
        """sigma = noise_multiplier x sqrt(k), on each word count."""
        return self.noise_multiplier * math.sqrt(self.max_words_per_record)

    @property
    def threshold(self) -> float:
        """tau = 1 + sigma Phi^-1(1 - threshold_delta / k): a count-1 word crosses it with
        probability threshold_delta / k."""
        return 1.0 + self.noise_std * -NormalDist().inv_cdf(self.threshold_delta / self.max_words_per_record)

    def event(self) -> DPSGDEvent:
        return gaussian_event(noise_multiplier=self.noise_multiplier)


def record_words(captions: Sequence[str], *, max_words: int, rng: random.Random) -> list[str]:
    """The <= `max_words` distinct words one record contributes: those in most of its captions
    first, ties in random order (a choice that depends on this record alone)."""
    from shared_model.data.vocab import tokenize

    in_captions = Counter(w for c in captions for w in set(tokenize(c)))
    words = sorted(in_captions)
    rng.shuffle(words)
    words.sort(key=lambda w: -in_captions[w])  # stable: ties keep the random order
    return words[:max_words]


def clipped_counts(captions: Sequence[Sequence[str]], *, max_words: int, seed: int = 0) -> Counter:
    """For each word, the number of records (caption sets) that contribute it (record_words)."""
    rng = random.Random(seed)
    return Counter(w for caps in captions for w in record_words(caps, max_words=max_words, rng=rng))


def noisy_release(counts: Counter, *, release: VocabRelease, rng: random.Random) -> dict[str, float]:
    """Gaussian noise on every count, then only the words above the threshold: {word: noisy count}."""
    sigma, tau, out = release.noise_std, release.threshold, {}
    for word in sorted(counts):  # sorted: a fixed seed reproduces the release
        noisy = counts[word] + rng.gauss(0.0, sigma)
        if noisy > tau:
            out[word] = noisy
    return out


def release_vocabulary(*, tx: LedgerTransaction, record_ids: Sequence[str], captions: Sequence[Sequence[str]],
                       budget: SiteBudget, release: VocabRelease, run_id: str, run_epsilon: float | None = None,
                       seed: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """The site's private vocabulary release inside its ledger transaction `tx`: plan against the
    site's budget, count, noise, threshold, append the "vocab-gaussian" line. Returns ({word: noisy
    count} of the released words, the ledger line).

    Budget (the same individual filter as a DP-SGD round, site_budget.plan_round): records whose
    epsilon after this release would exceed target_epsilon are left out (retired) and not counted;
    BudgetExhaustedError when fewer than `budget.min_records` remain, when the release alone costs
    more than the site's max_run_epsilon or than the run's `run_epsilon` (the release shares the
    run's allowance: the run's grant at its first round is what is left), or when threshold_delta
    exceeds the site's target_delta.
    `record_ids` and `captions` are the site's records, each distinct record once. `seed` None
    draws the noise from the OS's entropy (deployment); a seed reproduces a simulation."""
    if len(record_ids) != len(captions):
        raise ValueError(f"record_ids and captions must have the same length, got {len(record_ids)} and "
                         f"{len(captions)}")
    delta, acc, event = budget.target_delta, budget.enforcing, release.event()
    histories = tx.histories()

    def refuse(reason: str, spent: float = 0.0) -> BudgetExhaustedError:
        e = BudgetExhaustedError(spent=spent, projected=spent, target_epsilon=budget.target_epsilon,
                                 target_delta=delta, reason=reason)
        e.ledger_head = tx.head
        return e

    if release.threshold_delta >= delta:
        raise refuse(f"vocab-delta {release.threshold_delta:g} is not below the site's target-delta {delta:g}: the "
                     f"thresholding delta adds to every counted record's delta")
    # the run's own spend after this release (a record in all of the run's mechanisms so far)
    run_after = run_spend([*tx.run_events(run_id), event], accountant=acc, target_epsilon=budget.target_epsilon,
                          target_delta=delta, extra_delta=tx.run_extra_delta(run_id) + release.threshold_delta)
    for cap, name in ((budget.max_run_epsilon, "the site's max-run-epsilon"), (run_epsilon, "the run's run-epsilon")):
        if cap is not None and run_after >= cap:
            raise refuse(f"run {run_id}'s releases would cost epsilon {run_after:.4g} with this one "
                         f"(vocab-noise-multiplier {release.noise_multiplier:g}), not below {name} {cap:g}: no "
                         f"allowance would be left for training")
    admitted_ids, epsilon = admitted(histories, record_ids, event, budget, extra_delta=release.threshold_delta)
    members = set(admitted_ids)
    if len(members) < budget.min_records:
        raise refuse(f"privacy budget exhausted: only {len(members)} of {len(record_ids)} records can be counted "
                     f"without exceeding target_epsilon {budget.target_epsilon} (delta {delta:g}); min-records is "
                     f"{budget.min_records}", spent_so_far(histories, record_ids, budget))
    counted = [caps for rid, caps in zip(record_ids, captions) if rid in members]
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    counts = clipped_counts(counted, max_words=release.max_words_per_record, seed=rng.randrange(2**32))
    released = noisy_release(counts, release=release, rng=rng)
    line = tx.append_vocab_release(
        run_id=run_id, members=sorted(members), retired=len(record_ids) - len(members),
        noise_multiplier=release.noise_multiplier, max_words_per_record=release.max_words_per_record,
        threshold=release.threshold, threshold_delta=release.threshold_delta, words_released=len(released),
        target_epsilon=budget.target_epsilon, target_delta=delta, accountant=acc,
        epsilon=epsilon)
    return released, line


def merge_releases(releases: Sequence[dict[str, float]]) -> list[str]:
    """The server's side (post-processing): every released word, by summed noisy count (highest
    first, ties alphabetical)."""
    total: Counter = Counter()
    for r in releases:
        total.update(r)
    return sorted(total, key=lambda w: (-total[w], w))
