"""One training round at a site: DP-SGD inside one privacy transaction of the site ledger (no Flower).

Order of operations, each a privacy requirement (docs/privacy.md):
  1. lock the ledger, read and verify it once (hash chain, membership files), and check that it
     still holds the head the server witnessed last time (a lost or rolled-back ledger refuses);
  2. at a run's first round, release the run's noisy count and write it, then the run's grant
     (allowance, noise multiplier calibrated to it over the whole run, the sample rate and steps
     from the noisy count: site_budget.py);
  3. plan the round (site_budget.plan_round): refuse a round outside the plan or already trained,
     or one that would pass the grant; retire the records that would exceed the site's budget;
  4. train on the remaining records (Opacus: Poisson sampling, per-example clipping, noise, all
     drawn from generators seeded by the OS at a deployed site: privacy/randomness.py), and check
     that exactly the planned steps ran;
  5. append the round (mechanism + membership version, epsilon exactly as checked) before any
     weights leave the site; unlock.
The reply carries the weights and public values only: the noisy count as num-examples, the
mechanism's parameters, and the epsilon of a record in every event of the ledger (an upper bound
on every record's; the exact per-record figures never leave the site). No training loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from shared_model.data.datasets import CaptionDataset, FeatureDataset
from shared_model.data.records import CaptionSet
from shared_model.data.vocab import Vocabulary
from shared_model.model.captioner import Captioner, unwrap
from shared_model.model.optimizers import OPTIMIZERS, make_optimizer
from shared_model.model.precision import check_precision
from shared_model.model.features import FromFeatures
from shared_model.model.trainable import check_trainable, encoder_trains, set_trainable
from shared_model.model.training import train_epoch
from shared_model.privacy.dp import check_grad_sample_mode, private_training
from shared_model.privacy.identity import RecordIdentities, row_aliases
from shared_model.privacy.ledger import PrivacyLedger
from shared_model.privacy.ledger_lines import check_witness
from shared_model.privacy.site_budget import BudgetExhaustedError
from shared_model.privacy.randomness import gaussian, mechanism_randomness
from shared_model.privacy.reply import TrainMetrics
from shared_model.privacy.site_budget import (RunRequest, SiteBudget, make_grant, plan_round, public_epsilon,
                                              release_count)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LocalTraining:
    """A site's local training, as client/settings.local_training resolves it from the run config
    (pyproject.toml holds every default; nothing here has one of its own)."""

    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str  # adamw | sgd (momentum 0.9); a fresh optimizer state every round
    max_physical_batch_size: int | str  # DP: an int, or "auto" (the largest that fits memory: model/physical_batch.py)
    fixed_batch_shapes: bool  # DP: pad every physical batch to max_physical_batch_size (GPU)
    trainable: str  # all | decoder | fusion+decoder (shared_model/model/trainable.py)
    grad_sample_mode: str  # DP: hooks | ghost (Opacus ghost clipping; not the LSTM decoder)
    precision: str  # fp32 | bf16 (autocast) | auto (bf16 on a GPU); shared_model.model.precision.resolve_precision
    encoder_feature_cache: bool  # a frozen encoder's grids computed once (model/features.py)
    proximal_mu: float = 0.0  # FedProx's, from the train message (0: no proximal term)

    def __post_init__(self) -> None:
        if self.max_physical_batch_size != "auto" and not (isinstance(self.max_physical_batch_size, int)
                                                           and self.max_physical_batch_size >= 1):
            raise ValueError(f"max-physical-batch-size must be an integer >= 1 or 'auto', got "
                             f"{self.max_physical_batch_size!r}")
        for name in ("local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        check_trainable(self.trainable)
        check_grad_sample_mode(self.grad_sample_mode)
        check_precision(self.precision, grad_sample_mode=self.grad_sample_mode)


def site_records(data: CaptionSet, ledger: PrivacyLedger) -> tuple[list[str], list[int]]:
    """(record IDs, row indices), each record once, as the ledger knows them (privacy/identity.py:
    an image or declared id seen before keeps its record's history through edits). Call under the
    ledger's lock: new aliases are written before anything trains."""
    identities = RecordIdentities(ledger.path.parent / "identities.json")
    resolved = identities.resolve(data.record_ids(), row_aliases(data))
    if resolved.duplicates or resolved.conflicts:
        log.warning("%d row(s) are copies of a record already loaded and %d row(s) name two records: left out",
                    resolved.duplicates, resolved.conflicts)
    identities.save()
    return resolved.record_ids, resolved.rows


def train_round(*, model: Captioner, data: CaptionSet, vocab: Vocabulary, training: LocalTraining,
                budget: SiteBudget | None, ledger: PrivacyLedger | None, request: RunRequest | None,
                server_round: int, witness: tuple[str, int] | None = None, device: torch.device | str = "cpu",
                seed: int | None = None, feature_cache_dir: Path | None = None,
                memory_limit: int | None = None) -> dict[str, Any]:
    """Train `model` in place for one round; returns the reply's metrics (and `ledger-head`,
    `ledger-lines` when private). With `budget`, raises BudgetExhaustedError (nothing trained,
    nothing recorded but the run's count and grant) when the run or this round cannot go ahead, and
    LedgerRollbackError when the ledger lacks the witnessed head. `seed` None (a deployed site):
    the count, the Poisson sampling and the noise come from the OS's entropy; a seed (simulation)
    reproduces them, per round. When the encoder does not train (and `encoder_feature_cache`), the
    round trains from each record's encoder grid, computed once per encoder and kept in
    `feature_cache_dir` (None: in memory for this round; client/feature_cache.py). `memory_limit`
    (bytes) bounds a DP step when max-physical-batch-size is "auto" (devices.memory_budget)."""
    features = _features(model, data, training, feature_cache_dir, device)
    round_seed = None if seed is None else seed * 100_003 + server_round
    rand = mechanism_randomness(seed=round_seed, device=device)
    if budget is None:
        _train(model, data, vocab, training, event=None, budget=None, device=device, rand=rand,
               features=features, feature_rows=range(len(data)), memory_limit=memory_limit)
        return TrainMetrics.non_private(len(data)).as_metrics()
    with ledger.transaction() as tx:
        ids, rows = site_records(data, ledger)
        budget.check_delta(len(ids))
        if witness is not None:
            check_witness(tx.records, head=witness[0], count=witness[1], path=ledger.path)
        try:
            grant = tx.grant(request.run_id)
            if grant is None:  # the run's first round: its count, then its grant, both in the ledger
                count = release_count(histories=tx.histories(), record_ids=ids, budget=budget, request=request,
                                      gauss=lambda sigma: gaussian(sigma, seed=round_seed))
                tx.append_count(run_id=request.run_id, members=count.members,
                                noise_multiplier=request.count_noise_multiplier, noisy_count=count.noisy_count,
                                target_epsilon=budget.target_epsilon, target_delta=budget.target_delta,
                                accountant=budget.enforcing, epsilon=count.epsilon)
                history, history_delta = tx.events_before(request.run_id)
                grant = tx.append(make_grant(noisy_count=count.noisy_count, prior=tx.run_events(request.run_id),
                                             prior_extra_delta=tx.run_extra_delta(request.run_id), budget=budget,
                                             request=request, history=history, history_extra_delta=history_delta))
            plan = plan_round(histories=tx.histories(), grant=grant, record_ids=ids, budget=budget,
                              server_round=server_round, run_events=tx.run_events(request.run_id),
                              run_extra_delta=tx.run_extra_delta(request.run_id),
                              trained_rounds=tx.trained_rounds(request.run_id))
        except BudgetExhaustedError as e:
            e.ledger_head = tx.head  # the refusal reply carries it without reading the ledger again
            raise
        keep = set(plan.train_ids)
        subset_rows = [r for r, rid in zip(rows, ids) if rid in keep]
        steps = _train(model, data.subset(subset_rows), vocab, training, event=plan.event, budget=budget,
                       device=device, rand=rand, expected_batch_size=grant["records"] * grant["sample_rate"],
                       features=features, feature_rows=subset_rows, memory_limit=memory_limit)
        if steps != plan.event.steps:  # the ledger must describe the mechanism that ran
            raise RuntimeError(f"the round took {steps} optimizer steps where the plan (and the ledger) says "
                               f"{plan.event.steps}; nothing is sent")
        tx.append_round(run_id=request.run_id, server_round=server_round, event=plan.event, members=plan.train_ids,
                        retired=plan.retired, max_grad_norm=budget.max_grad_norm,
                        target_epsilon=budget.target_epsilon, target_delta=budget.target_delta,
                        accountant=budget.enforcing, epsilon=plan.epsilon_trained,
                        init_checkpoint=request.init_checkpoint)
        events, extra = tx.all_events()
        head, count_lines = tx.head
    bound = public_epsilon(events, extra, budget)
    metrics = TrainMetrics(num_examples=int(grant["records"]), epsilon=bound, delta=budget.target_delta,
                           target_epsilon=budget.target_epsilon,
                           epsilon_remaining=max(0.0, budget.target_epsilon - bound),
                           run_epsilon_granted=grant["granted_epsilon"], run_epsilon_spent=plan.run_epsilon_after,
                           noise_multiplier=plan.event.noise_multiplier, sample_rate=plan.event.sample_rate,
                           steps=plan.event.steps)
    return {**metrics.as_metrics(), "ledger-head": head, "ledger-lines": count_lines}


def _features(model: Captioner, data: CaptionSet, training: LocalTraining, cache_dir: Path | None,
              device) -> np.ndarray | None:
    """Every record's encoder grid when the encoder does not train, else None (train from images)."""
    if not training.encoder_feature_cache or encoder_trains(training.trainable):
        return None
    from .feature_cache import site_features

    features, cached = site_features(model, data, cache_dir=cache_dir, device=device)
    log.info("encoder features of %d records %s", len(data), "from the cache" if cached else "computed")
    return features


def _auto_physical_batch(module, dataset, training: LocalTraining, *, device, memory_limit: int | None) -> int:
    """max-physical-batch-size "auto": the largest physical batch whose DP step fits the memory
    budget, from a short probe (model/physical_batch.py); it never changes the sampling or the
    accounting, only how a Poisson batch is split."""
    from shared_model.model.devices import memory_budget
    from shared_model.model.physical_batch import describe, physical_batch_size

    budget = memory_budget(torch.device(device), limit_bytes=memory_limit)
    module.to(device).train()
    with torch.random.fork_rng(devices=[]):  # the probe's caption draw leaves the round's draws as they were
        example = dataset[0]
    size, per_example = physical_batch_size(module, example, budget=budget, cap=2 * training.batch_size,
                                            grad_sample_mode=training.grad_sample_mode)
    log.info("max-physical-batch-size auto: %s", describe(size, per_example, budget))
    return size


def _train(model: Captioner, data: CaptionSet, vocab: Vocabulary, training: LocalTraining, *, event,
           budget: SiteBudget | None, device, rand, expected_batch_size: float = 0.0,
           features: np.ndarray | None = None, feature_rows=None, memory_limit: int | None = None) -> int:
    """Local training; the optimizer steps taken (under DP: those the accountant counts). With
    `features` (row `feature_rows[i]` is record i's encoder grid), from the grids, not the images."""
    if features is None:
        dataset, module = CaptionDataset(data, vocab, max_len=model.config.max_len), model
    else:
        dataset = FeatureDataset(data, features, list(feature_rows), vocab, max_len=model.config.max_len)
        module = FromFeatures(model)
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True, generator=rand.sampling)
    model.to(device).train()
    params = set_trainable(model, training.trainable)  # before make_private: frozen = no grad, no noise
    global_weights = [p.detach().clone() for p in model.parameters()] if training.proximal_mu else None
    optimizer = make_optimizer(training.optimizer, params, lr=training.lr)
    physical = training.max_physical_batch_size
    if event is not None and physical == "auto":
        physical = _auto_physical_batch(module, dataset, training, device=device, memory_limit=memory_limit)
    wrapped = module
    if event is not None:
        _, wrapped, optimizer, loader = private_training(
            module=module, optimizer=optimizer, dataset=dataset, event=event, epochs=training.local_epochs,
            expected_batch_size=expected_batch_size, max_grad_norm=budget.max_grad_norm,
            accountant=budget.accountant, grad_sample_mode=training.grad_sample_mode,
            sampling_generator=rand.sampling, noise_generator=rand.noise)

    def proximal_pull() -> None:  # FedProx's proximal gradient, data-independent: no privacy cost
        with torch.no_grad():
            for p, g in zip(unwrap(wrapped).parameters(), global_weights):
                p.sub_(training.lr * training.proximal_mu * (p - g))

    steps = 0
    for _ in range(training.local_epochs):
        stats = train_epoch(wrapped, optimizer, loader, device=device,
                            max_physical_batch_size=physical if event else None,
                            after_step=proximal_pull if global_weights is not None else None,
                            fixed_batch_shapes=training.fixed_batch_shapes and event is not None,
                            precision=training.precision)
        steps += stats["steps"]
    return steps
