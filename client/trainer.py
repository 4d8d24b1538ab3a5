"""One training round at a site: DP-SGD inside one privacy transaction of the site ledger (no Flower).

Order of operations, each a privacy requirement (docs/privacy.md):
  1. lock the ledger, read and verify it once (hash chain, membership files), and check that it
     still holds the head the server witnessed last time (a lost or rolled-back ledger refuses);
  2. plan the round from public quantities and the ledger only (site_budget.plan_round): the run's
     grant (allowance and noise multiplier calibrated to it over the whole run plan, written once
     per run), each record's projected epsilon, the records retired because they would exceed the
     site's budget, and the Poisson sample rate over the records that remain;
  3. train on the remaining records (Opacus: Poisson sampling, per-example clipping, noise);
  4. append the round (mechanism + membership version, epsilon exactly as checked) before any
     weights leave the site; unlock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from shared_model.data import CaptionDataset, CaptionSet, Vocabulary
from shared_model.model import Captioner, check_precision, check_trainable, set_trainable, train_epoch
from shared_model.privacy import (BudgetExhaustedError, PrivacyLedger, RunRequest, SiteBudget, check_grad_sample_mode,
                                  check_witness, compute_epsilon, plan_round, private_training, unwrap)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalTraining:
    local_epochs: int
    batch_size: int
    lr: float
    max_physical_batch_size: int = 128
    proximal_mu: float = 0.0  # FedProx: after each step, w -= lr * mu * (w - w_global)
    fixed_batch_shapes: bool = False  # DP: pad every physical batch to max_physical_batch_size (GPU)
    trainable: str = "all"  # all | decoder | fusion+decoder (shared_model/model/trainable.py)
    grad_sample_mode: str = "hooks"  # DP: hooks | ghost (Opacus ghost clipping; not the LSTM decoder)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 on a GPU); shared_model.model.resolve_precision

    def __post_init__(self) -> None:
        for name in ("local_epochs", "batch_size", "max_physical_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        check_trainable(self.trainable)
        check_grad_sample_mode(self.grad_sample_mode)
        check_precision(self.precision, grad_sample_mode=self.grad_sample_mode)


def unique_records(data: CaptionSet) -> tuple[list[str], list[int]]:
    """(content IDs, row indices) with each distinct record once: a record present twice would be
    sampled twice per step, which the per-record accounting does not cover."""
    seen: dict[str, int] = {}
    for i, rid in enumerate(data.record_ids()):
        seen.setdefault(rid, i)
    if len(seen) < len(data):
        log.warning("%d duplicate record(s) (same image and captions) left out", len(data) - len(seen))
    return list(seen), list(seen.values())


def train_round(*, model: Captioner, data: CaptionSet, vocab: Vocabulary, training: LocalTraining,
                budget: SiteBudget | None, ledger: PrivacyLedger | None, request: RunRequest | None,
                server_round: int, witness: tuple[str, int] | None = None, device: torch.device | str = "cpu",
                seed: int = 0) -> dict[str, Any]:
    """Train `model` in place for one round; returns the reply's metrics (and `ledger-head`,
    `ledger-records` when private). With `budget`, raises BudgetExhaustedError (nothing trained,
    nothing recorded but the run's grant) when too few records can train, and LedgerRollbackError
    when the ledger lacks the witnessed head."""
    torch.manual_seed(seed * 100_003 + server_round)
    if budget is None:
        losses = _train(model, data, vocab, training, event=None, budget=None, device=device)
        return {"num-examples": len(data), "train-loss": losses[-1]}
    ids, rows = unique_records(data)
    budget.check_delta(len(ids))
    with ledger.transaction() as tx:
        if witness is not None:
            check_witness(tx.records, head=witness[0], count=witness[1], path=ledger.path)
        try:
            released = tx.run_releases(request.run_id)  # this run's vocabulary release shares its allowance
            plan = plan_round(histories=tx.histories(), grant=tx.grant(request.run_id), record_ids=ids,
                              budget=budget, request=request, server_round=server_round,
                              spent_in_run=compute_epsilon(released, target_delta=budget.target_delta,
                                                           accountant=budget.accountant))
        except BudgetExhaustedError as e:
            e.ledger_head = tx.head  # the refusal reply carries it without reading the ledger again
            raise
        if plan.new_grant:
            tx.append(plan.grant)
        keep = set(plan.train_ids)
        subset = data.subset([r for r, rid in zip(rows, ids) if rid in keep])
        losses = _train(model, subset, vocab, training, event=plan.event, budget=budget, device=device)
        tx.append_round(run_id=request.run_id, server_round=server_round, event=plan.event, members=plan.train_ids,
                        retired=plan.retired, max_grad_norm=budget.max_grad_norm,
                        target_epsilon=budget.target_epsilon, target_delta=budget.target_delta,
                        accountant=budget.accountant, epsilon=plan.epsilon_trained,
                        init_checkpoint=request.init_checkpoint)
        head, count = tx.head
    return {"num-examples": len(subset), "train-loss": losses[-1], "epsilon": plan.epsilon_after,
            "delta": budget.target_delta, "target-epsilon": budget.target_epsilon,
            "epsilon-remaining": budget.target_epsilon - plan.epsilon_after,
            "run-epsilon-granted": plan.grant["granted_epsilon"], "records-trained": len(plan.train_ids),
            "records-retired": plan.retired, "noise-multiplier": plan.event.noise_multiplier,
            "sample-rate": plan.event.sample_rate, "steps": plan.event.steps,
            "ledger-head": head, "ledger-records": count}


def _train(model: Captioner, data: CaptionSet, vocab: Vocabulary, training: LocalTraining, *, event,
           budget: SiteBudget | None, device) -> list[float]:
    loader = DataLoader(CaptionDataset(data, vocab, max_len=model.config.max_len), batch_size=training.batch_size,
                        shuffle=True)
    model.to(device).train()
    params = set_trainable(model, training.trainable)  # before make_private: frozen = no grad, no noise
    global_weights = [p.detach().clone() for p in model.parameters()] if training.proximal_mu else None
    optimizer = torch.optim.AdamW(params, lr=training.lr)
    wrapped = model
    if event is not None:
        _, wrapped, optimizer, loader = private_training(module=model, optimizer=optimizer, data_loader=loader,
                                                         event=event, max_grad_norm=budget.max_grad_norm,
                                                         accountant=budget.accountant,
                                                         grad_sample_mode=training.grad_sample_mode)

    def proximal_pull() -> None:  # FedProx's proximal gradient, data-independent: no privacy cost
        with torch.no_grad():
            for p, g in zip(unwrap(wrapped).parameters(), global_weights):
                p.sub_(training.lr * training.proximal_mu * (p - g))

    losses = []
    for _ in range(training.local_epochs):
        stats = train_epoch(wrapped, optimizer, loader, device=device,
                            max_physical_batch_size=training.max_physical_batch_size if event else None,
                            after_step=proximal_pull if global_weights is not None else None,
                            fixed_batch_shapes=training.fixed_batch_shapes and event is not None,
                            precision=training.precision)
        losses.append(stats["loss"])
    return losses
