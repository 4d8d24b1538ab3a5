"""Individual (per-record) privacy accounting over a site ledger's DP-SGD events.

Privacy unit: one record at one site (add/remove neighbours). A record's privacy loss is the
composition of exactly the events whose sampled-from set (membership) contained it: a record that
was not in a dataset contributes nothing to that event's output, so its individual privacy loss for
that event is zero (Feldman and Zrnic, "Individual Privacy Accounting via a Rényi Filter", NeurIPS
2021). Records are grouped by identical event history, so the cost is one accountant call per
distinct history (and, through `accounting.merge_events`, per distinct multiset of mechanisms), not
one per record.

`RecordHistories` is incremental: events are added in ledger order, and after each one the groups
that took part in it are known, which is what both the site (before a round) and the audit (after
every ledger line) need.

Delta composes too. An event may carry an `extra_delta` beyond what the accountant reports (the
private vocabulary release's thresholding delta, vocab_release.py): a record whose events carry
extra deltas d_1..d_k has the guarantee (eps, delta_acc + sum d_i), where eps is the accountant's
epsilon at delta_acc. Its epsilon "at target_delta" is therefore the accountant's epsilon at
delta_acc = target_delta - sum d_i (`conversion_delta`), and infinite when nothing is left: such a
record can take part in nothing more, and the site's filter retires it.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from shared_model.privacy.accounting import (DPSGDEvent, Signature, add_to_signature, compute_epsilon, dominates,
                                             signature, signature_epsilon)


class RecordHistories:
    """A partition of record IDs by the exact list of events (ledger order) they were sampled from."""

    def __init__(self) -> None:
        self.events: list[DPSGDEvent] = []
        self.extra_delta: list[float] = []  # per event: delta beyond the accountant's (thresholding)
        self.group_of: dict[str, int] = {}
        self.history: list[list[int]] = []  # group id -> indices into self.events
        self.size: list[int] = []
        self._last: tuple[str, list[int]] | None = None  # (membership version, groups it touched)

    def add(self, event: DPSGDEvent, version: str, members: Iterable[str], *, extra_delta: float = 0.0) -> list[int]:
        """Record that `event` sampled from `members` (the set named `version`); returns the ids of
        the groups now holding exactly those members. `extra_delta`: the event's delta beyond the
        accountant's (0 for DP-SGD and counts)."""
        i = len(self.events)
        self.events.append(event)
        self.extra_delta.append(float(extra_delta))
        if self._last is not None and self._last[0] == version:
            # the same set as the event before: the groups it made hold exactly these members
            for g in self._last[1]:
                self.history[g].append(i)
            return self._last[1]
        moved: dict[int, int] = {}  # old group (-1: a record never sampled) -> its new group
        for rid in members:
            old = self.group_of.get(rid, -1)
            new = moved.get(old)
            if new is None:
                new = len(self.history)
                self.history.append((self.history[old] if old >= 0 else []) + [i])
                self.size.append(0)
                moved[old] = new
            if old >= 0:
                self.size[old] -= 1
            self.size[new] += 1
            self.group_of[rid] = new
        touched = list(moved.values())
        self._last = (version, touched)
        return touched

    def group_events(self, group: int) -> list[DPSGDEvent]:
        return [self.events[i] for i in self.history[group]]

    def signature(self, group: int) -> Signature:
        return signature(self.group_events(group))

    def prefix_signatures(self, group: int) -> list[Signature]:
        """The group's signature after each event of its history, in order (for replaying audits)."""
        out, sig = [], ()
        for i in self.history[group]:
            sig = add_to_signature(sig, self.events[i])
            out.append(sig)
        return out

    def delta_spent(self, group: int) -> float:
        """The sum of the extra deltas of the group's events (-1, a fresh record: 0)."""
        return sum(self.extra_delta[i] for i in self.history[group]) if group >= 0 else 0.0

    def epsilon(self, group: int, *, target_delta: float, accountant: str) -> float:
        """The group's epsilon at `target_delta`, its extra deltas taken off the conversion delta."""
        delta = conversion_delta(target_delta, self.delta_spent(group))
        if delta is None:
            return math.inf
        return signature_epsilon(self.signature(group), target_delta=delta, accountant=accountant)

    def max_epsilon(self, groups: Iterable[int], *, target_delta: float, accountant: str) -> float:
        """The largest epsilon among `groups`, computing only those no other group dominates (per
        conversion delta: groups with different extra deltas are compared apart)."""
        by_delta: dict[float, list] = {}
        for g in groups:
            by_delta.setdefault(self.delta_spent(g), []).append(self.signature(g))
        out = 0.0
        for spent, sigs in by_delta.items():
            delta = conversion_delta(target_delta, spent)
            if delta is None:
                return math.inf
            out = max(out, max_signature_epsilon(sigs, target_delta=delta, accountant=accountant))
        return out

    def groups_of(self, record_ids: Iterable[str]) -> dict[int, list[str]]:
        """record IDs by group id; -1 holds the records that no event ever sampled from."""
        out: dict[int, list[str]] = {}
        for rid in record_ids:
            out.setdefault(self.group_of.get(rid, -1), []).append(rid)
        return out

    def live_groups(self) -> list[int]:
        return [g for g, n in enumerate(self.size) if n > 0]


def max_signature_epsilon(sigs: Sequence[Signature], *, target_delta: float, accountant: str) -> float:
    """max epsilon over `sigs` (0.0 for none); a signature dominated by another is not computed."""
    distinct = list(dict.fromkeys(sigs))
    top = [a for k, a in enumerate(distinct)
           if not any(dominates(b, a) and b != a for j, b in enumerate(distinct) if j != k)]
    return max((signature_epsilon(a, target_delta=target_delta, accountant=accountant) for a in top), default=0.0)


def conversion_delta(target_delta: float, extra: float) -> float | None:
    """The delta left for the accountant's conversion once `extra` (thresholding deltas) is spent;
    None when nothing is left (the record's guarantee would pass target_delta)."""
    left = target_delta - extra
    return left if left > target_delta * 1e-9 else None


def projected_epsilons(histories: RecordHistories, groups: Sequence[int], planned: DPSGDEvent, *,
                       target_delta: float, accountant: str, extra_delta: float = 0.0) -> dict[int, float]:
    """Each group's epsilon after `planned` (with its `extra_delta`) on top of its history (-1: a
    fresh record); infinite where the extra deltas leave no conversion delta."""
    out = {}
    for g in groups:
        delta = conversion_delta(target_delta, histories.delta_spent(g) + extra_delta)
        out[g] = math.inf if delta is None else compute_epsilon(
            [*(histories.group_events(g) if g >= 0 else []), planned], target_delta=delta, accountant=accountant)
    return out
