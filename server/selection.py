"""Best-round selection: which of a run's checkpoints to hand back, and the signal that picked it.

The server scores the global model on its own evaluation set before round 1 (round 0: the model
the federation starts from, fresh, init-from or resume-from) and after every round
(server/server_app.py). `checkpoints/BEST` names the round with the highest SELECTION_METRIC
among the scored rounds that have a checkpoint, round 0 included; ties go to the earlier round.
So a run never hands back a model worse than its start on that signal. `checkpoints/LATEST` names
the last trained round: the one to continue training from (resume-from).
"""

from __future__ import annotations

import math
from typing import Any, Collection, Iterable, Mapping

SELECTION_METRIC = "CIDEr-D"  # higher is better


def best_round(rows: Iterable[Mapping[str, Any]], *, candidates: Collection[int]) -> Mapping[str, Any] | None:
    """The metrics row (metrics.jsonl) of the best round among `candidates` (rounds with a
    checkpoint): the highest finite SELECTION_METRIC, the earlier round on a tie; None when no
    candidate was scored."""
    scored = [r for r in rows if r.get("round") in candidates and _finite(r.get(SELECTION_METRIC))]
    return max(scored, key=lambda r: (r[SELECTION_METRIC], -r["round"]), default=None)


def selection_signal(run_config: Mapping[str, Any], *, records: int) -> str:
    """What picked BEST, in words: the metric, the evaluation set and the decoding."""
    beam = int(run_config["eval-beam-size"])
    decoding = "greedy decoding" if beam == 1 else "beam search"
    source = str(run_config["server-eval-data"]) or f"the {run_config['data-scenario']} scenario's test split"
    return (f"server-side validation {SELECTION_METRIC} on {records} records of the server's evaluation set "
            f"({source}), {decoding} (eval-beam-size {beam})")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
