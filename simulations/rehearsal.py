"""Rehearsal on public data: the planned federation, run on public records over a small grid of
settings, to choose the settings before any site budget is spent (issue 21).

Each simulated site is a disjoint slice of the public data, of the size of a real site (a number
the server learns anyway, from `num-examples`). Each grid point runs an in-process FedAvg
federation from the model the server would start from, and after every round scores the global
model on a held-out set with the server's own evaluation (CIDEr-D, the signal that picks BEST).

Why a plain loop is faithful to the real federation (Flower, the ClientApp and the ServerApp):
  - each site's round is the site's own code, `client.trainer.train_round`, with the site's own
    rules built from the run config by client/settings.py (`site_budget`, `run_request`,
    `local_training`, `mechanism_seed`) and a real `PrivacyLedger`: the noisy count release, the
    grant (the noise multiplier calibrated to run-epsilon over the whole plan, rounds x local
    epochs), the Poisson sample rate, the steps and the clipping are exactly the site's, and so
    are the ones `fedcap plan` reports for the same counts (privacy/plan.py uses the same grant);
  - the server's side is FedAvg as Flower's FedAvg computes it (the arrays' weighted mean, weights
    num-examples over their sum, cast back to the model's dtypes) with the weights FedCapStrategy
    hands it (server/update_checks.capped_weights); FedProx differs only in the proximal-mu the
    sites receive. Other strategies are not rehearsed (refused by name);
  - the start is the server's (server/initial_model.py: fresh, or init-from with its vocabulary),
    and the score is the server's call of `evaluate` (greedy or beam by eval-beam-size, no METEOR).
What Flower would add and the rehearsal leaves out: messages, processes, update checks (honest
sites pass them), the witness of ledger heads.

Privacy: the rehearsal touches public records only, and every file it writes (each grid point's
ledgers, the sites' encoder features) lives in one temporary folder, removed when it ends; it
never reads or writes a site's state (`site-state-dir`, `federation-state` are ignored), so it
spends no site budget. Choosing settings on it is post-processing of public data. Every grid point uses the same seeds (data slices, DP
randomness), so two points differ by their settings, not by their draws.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from server.selection import SELECTION_METRIC as SELECTION  # the signal that picks BEST, higher is better
from server.selection import best_round
from shared_model.data.records import CaptionSet
from shared_model.run_settings import validate_run_config

GRID_KEYS = ("lr", "local-epochs", "trainable", "optimizer")  # the settings issue 21 names
REHEARSED_STRATEGIES = ("fedavg", "fedprox")


@dataclass
class PointResult:
    """One grid point's federation: its settings (GRID_KEYS), what each site's grant used, the score
    of every round (round 0: the start)."""

    settings: dict[str, Any]
    trainable_parameters: int
    noise_multipliers: list[float]  # per site, as its train_round reported (0: no DP)
    steps_per_round: list[int]  # per site
    noise_to_signal: float  # the plan's run ratio, the largest over the sites (privacy/plan.py); 0: no DP
    scores: list[float] = field(default_factory=list)  # SELECTION per round, round 0 first
    seconds: float = 0.0

    @property
    def best_round(self) -> int:
        """The round BEST would name: server/selection.py's rule over every round, round 0 included."""
        rows = [{"round": r, SELECTION: s} for r, s in enumerate(self.scores)]
        return best_round(rows, candidates=range(len(rows)))["round"]

    @property
    def best_score(self) -> float:
        return self.scores[self.best_round]

    @property
    def final_score(self) -> float:
        return self.scores[-1]


@dataclass
class Rehearsal:
    records: list[int]
    rounds: int
    points: list[PointResult]

    @property
    def chosen(self) -> PointResult | None:
        """The highest best-round score; on a tie the fewer trainable parameters, then grid order.
        None when no point's federation scored above the start (every best round is round 0): the
        rehearsal then cannot tell the points apart by what they learn, only by how much they lose,
        which says nothing about the sites (public data unlike theirs loses under every setting)."""
        improved = [i for i, p in enumerate(self.points) if p.best_round > 0]
        if not improved:
            return None
        k = max(improved, key=lambda i: (self.points[i].best_score, -self.points[i].trainable_parameters, -i))
        return self.points[k]

    def table(self) -> str:
        """The grid as a markdown table, the chosen point marked."""
        chosen = self.chosen
        head = ["#", *GRID_KEYS, "trainable parameters", "noise multiplier (sites)", "noise / signal (run)",
                f"round 0 {SELECTION}", f"best {SELECTION} (round)", f"final {SELECTION}", "time"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for i, p in enumerate(self.points):
            mark = " **chosen**" if p is chosen else ""
            sigma = ", ".join(f"{s:.3f}" for s in p.noise_multipliers) if any(p.noise_multipliers) else "no DP"
            cells = [f"{i}{mark}", *(_cell(p.settings[k]) for k in GRID_KEYS), f"{p.trainable_parameters:,}", sigma,
                     f"{p.noise_to_signal:.2f}" if p.noise_to_signal else "-", f"{p.scores[0]:.4f}",
                     f"{p.best_score:.4f} ({p.best_round})", f"{p.final_score:.4f}", f"{p.seconds:.0f} s"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid_points(run_config: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of `grid`'s values (keys among GRID_KEYS; a key left out keeps the run
    config's value), each value and each point checked by the run-config schema (TypeError or
    ValueError naming the key and the value) before anything trains."""
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise ValueError(f"the rehearsal grid varies {', '.join(GRID_KEYS)}, got {unknown[0]!r}")
    rc = validate_run_config(run_config)
    axes = {}
    for key in GRID_KEYS:
        values = list(grid.get(key) or [rc[key]])
        checked = [validate_run_config({**rc, key: v})[key] for v in values]  # names the bad value
        axes[key] = list(dict.fromkeys(checked))  # order kept, repeats dropped
    points = [dict(zip(GRID_KEYS, combo)) for combo in itertools.product(*axes.values())]
    for point in points:
        validate_run_config({**rc, **point})
    return points


def site_slices(public: CaptionSet, records: Sequence[int], *, seed: int) -> list[CaptionSet]:
    """Disjoint slices of `public`, one per site, of `records` records each (a seeded shuffle)."""
    import numpy as np

    if not records or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in records):
        raise ValueError(f"records must be site sizes, each an int >= 1, got {list(records)!r}")
    if sum(records) > len(public):
        raise ValueError(f"the sites' records sum to {sum(records)} ({list(records)}), more than the "
                         f"{len(public)} public training records")
    order = np.random.default_rng(seed).permutation(len(public))
    ends = np.cumsum(records)
    return [public.subset(order[end - n: end]) for n, end in zip(records, ends)]


def _node(k: int, n: int) -> dict[str, int]:
    return {"partition-id": k, "num-partitions": n}  # a simulated site's node_config


def _fedavg(states: list[dict], weights: list[int]) -> dict:
    """Flower FedAvg's weighted mean (factors w / sum(w)), in each array's own dtype."""
    import torch

    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        work = ref.dtype if ref.is_floating_point() else torch.float64
        out[key] = sum(state[key].to(work) * (w / total) for state, w in zip(states, weights)).to(ref.dtype)
    return out


def rehearse(run_config: Mapping[str, Any], *, public: CaptionSet, held_out: CaptionSet, records: Sequence[int],
             grid: Mapping[str, Sequence[Any]], device: str = "cpu",
             on_round: Callable[[int, int, float], None] | None = None) -> Rehearsal:
    """Run the federation of `run_config` (complete: defaults + overrides; its init-from, if any, is
    the start) for every grid point, on sites that are disjoint slices of `public` of `records`
    records, scoring each round on `held_out`. `on_round(point, round, score)` after each round.
    Every value is checked, and every site's plan made (a grant no noise fits is a ValueError),
    before anything trains."""
    from client.settings import local_training, mechanism_seed, run_request, site_budget
    from client.trainer import train_round
    from server.initial_model import initial_model
    from server.server_data import server_vocabulary
    from server.update_checks import capped_weights
    from shared_model.evaluation.evaluator import evaluate
    from shared_model.model.captioner import Captioner
    from shared_model.model.checkpoint import model_state
    from shared_model.model.config import captioner_config_from_run_config
    from shared_model.model.trainable import set_trainable
    from shared_model.privacy.ledger import PrivacyLedger
    from shared_model.privacy.plan import site_plan
    from shared_model.privacy.site_budget import BudgetExhaustedError

    rc = validate_run_config(run_config)
    if rc["strategy"] not in REHEARSED_STRATEGIES:
        raise ValueError(f"the rehearsal runs FedAvg ({', '.join(REHEARSED_STRATEGIES)}), got strategy "
                         f"{rc['strategy']!r}")
    if rc["vocab-source"] == "private":
        raise ValueError("vocab-source 'private' releases the vocabulary from the sites' captions during the run; "
                         "rehearse with the vocabulary the run will use (vocab-file, or init-from's)")
    points = grid_points(rc, grid)
    slices = site_slices(public, list(records), seed=rc["seed"])
    n = len(slices)
    if len(held_out) < 1:
        raise ValueError("the held-out set to score the rounds on is empty")
    init = initial_model(rc, server_vocabulary(rc))  # the server's start: fresh or init-from, its vocabulary
    vocab, config = init.vocab, captioner_config_from_run_config(rc, vocab_size=len(init.vocab))
    start = model_state(init.model)
    train_config = {"init-checkpoint": init.sha256}
    if rc["strategy"] == "fedprox":
        train_config["proximal-mu"] = rc["proximal-mu"]  # what Flower's FedProx sends the sites

    def trainable_size(spec: str) -> int:
        return sum(p.numel() for p in set_trainable(Captioner(config), spec))

    results = []
    for i, point in enumerate(points):  # plan every point first: public quantities only, nothing trains
        prc = validate_run_config({**rc, **point})
        d = trainable_size(point["trainable"])
        ratio = 0.0
        if prc["dp"]:
            request = run_request(prc, train_config, run_id=f"rehearsal-{i}")
            try:
                ratio = max(site_plan(records=m, request=request, budget=site_budget(prc, _node(k, n)),
                                      trainable_parameters=d).run_noise_to_signal for k, m in enumerate(records))
            except BudgetExhaustedError as e:
                raise ValueError(f"grid point {point}: {e}") from None
        results.append(PointResult(settings=dict(point), trainable_parameters=d, noise_multipliers=[0.0] * n,
                                   steps_per_round=[0] * n, noise_to_signal=ratio))

    scorer = init.model.to(device)

    def score(state: dict) -> float:
        scorer.load_state_dict(state)
        metrics, _ = evaluate(scorer, held_out, vocab, beam_size=rc["eval-beam-size"], device=device, meteor=False)
        return float(metrics[SELECTION])

    round0 = score(start)  # the same start for every point
    rounds = rc["num-server-rounds"]

    def federate(i: int, point: dict, result: PointResult, *, tmp: Path) -> None:
        t0 = time.perf_counter()
        prc = validate_run_config({**rc, **point})
        training = local_training(prc, train_config)
        request = run_request(prc, train_config, run_id=f"rehearsal-{i}")
        budgets = [site_budget(prc, _node(k, n)) for k in range(n)]
        ledgers = [PrivacyLedger(tmp / f"point-{i}" / f"site-{k}" / "ledger.jsonl") if budgets[k] else None
                   for k in range(n)]
        result.scores.append(round0)
        state = start
        for server_round in range(1, rounds + 1):
            states, examples = [], {}
            for k, data in enumerate(slices):
                model = Captioner(config)
                model.load_state_dict(state, strict=True)
                metrics = train_round(model=model, data=data, vocab=vocab, training=training, budget=budgets[k],
                                      ledger=ledgers[k], request=request if budgets[k] else None,
                                      server_round=server_round, device=device,
                                      seed=mechanism_seed(prc, _node(k, n)),
                                      feature_cache_dir=tmp / "features" / f"site-{k}")
                states.append(model_state(model))
                examples[f"site-{k}"] = int(metrics["num-examples"])
                result.noise_multipliers[k] = float(metrics["noise-multiplier"])
                result.steps_per_round[k] = int(metrics["steps"])
            weights = capped_weights(examples, cap_ratio=prc["examples-cap-ratio"])
            state = _fedavg(states, [weights[f"site-{k}"] for k in range(n)])
            result.scores.append(score(state))
            if on_round is not None:
                on_round(i, server_round, result.scores[-1])
        result.seconds = time.perf_counter() - t0

    # the only files it writes: each point's ledgers and the sites' encoder features (a frozen encoder's,
    # computed once for every round and point, as a deployed site keeps them: client/feature_cache.py)
    with tempfile.TemporaryDirectory(prefix="fedcap-rehearsal-") as tmp:
        for i, (point, result) in enumerate(zip(points, results)):
            federate(i, point, result, tmp=Path(tmp))
    return Rehearsal(records=list(records), rounds=rounds, points=results)
