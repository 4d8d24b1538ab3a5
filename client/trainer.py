"""One training round at a site with DP-SGD, its budget check and its ledger record (no Flower).

Order of operations, each a privacy requirement:
  1. the mechanism of this round is fixed before any data is touched: sample_rate q = 1 / number
     of Poisson batches per epoch (as Opacus's DPDataLoader uses), steps = local_epochs x batches,
     noise_multiplier given or calibrated from the site's target epsilon over the WHOLE run plan
     (num_rounds x local_epochs epochs), never one round;
  2. the ledger projects the epsilon of the dataset's whole history plus this round and refuses
     (BudgetExhaustedError) if it would exceed the site's budget;
  3. training runs (Opacus, Poisson sampling, per-example clipping, Gaussian noise);
  4. the round is appended to the ledger (fsynced) before any weights leave the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from shared_model.data import CaptionDataset, CaptionSet, Vocabulary
from shared_model.model import Captioner, check_trainable, set_trainable, train_epoch
from shared_model.privacy import DPSGDEvent, PrivacyLedger, check_dp_args, plan_dp_sgd, private_training, unwrap


@dataclass(frozen=True)
class SitePrivacy:
    """The site's DP settings; target_epsilon/target_delta are its lifetime budget."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrate over the run plan
    accountant: str = "prv"

    def __post_init__(self) -> None:
        check_dp_args(max_grad_norm=self.max_grad_norm, target_delta=self.target_delta,
                      noise_multiplier=self.noise_multiplier, target_epsilon=self.target_epsilon,
                      accountant=self.accountant)


@dataclass(frozen=True)
class LocalTraining:
    local_epochs: int
    batch_size: int
    lr: float
    max_physical_batch_size: int = 128
    proximal_mu: float = 0.0  # FedProx: after each step, w -= lr * mu * (w - w_global)
    trainable: str = "all"  # all | decoder | fusion+decoder (shared_model/model/trainable.py)

    def __post_init__(self) -> None:
        for name in ("local_epochs", "batch_size", "max_physical_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {self.proximal_mu}")
        check_trainable(self.trainable)


def planned_event(*, num_records: int, training: LocalTraining, privacy: SitePrivacy, num_rounds: int) -> DPSGDEvent:
    """This round's mechanism, from public quantities only (the site's record count, the plan)."""
    return plan_dp_sgd(num_records=num_records, batch_size=training.batch_size, epochs=training.local_epochs,
                       plan_epochs=training.local_epochs * num_rounds, noise_multiplier=privacy.noise_multiplier,
                       target_epsilon=privacy.target_epsilon, target_delta=privacy.target_delta,
                       accountant=privacy.accountant)


def train_round(*, model: Captioner, data: CaptionSet, vocab: Vocabulary, training: LocalTraining,
                privacy: SitePrivacy | None, ledger: PrivacyLedger | None, run_id: str, server_round: int,
                num_rounds: int, device: torch.device | str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Train `model` in place for one round. Returns metrics for the reply. With `privacy`, raises
    BudgetExhaustedError (nothing trained, nothing recorded) when the budget would be exceeded."""
    torch.manual_seed(seed * 100_003 + server_round)
    dataset = CaptionDataset(data, vocab, max_len=model.config.max_len)
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True)
    model.to(device).train()
    params = set_trainable(model, training.trainable)  # before make_private: frozen = no grad, no noise
    global_weights = [p.detach().clone() for p in model.parameters()] if training.proximal_mu else None
    optimizer = torch.optim.AdamW(params, lr=training.lr)
    event = None
    if privacy is not None:
        fingerprint = data.fingerprint()
        event = planned_event(num_records=len(data), training=training, privacy=privacy, num_rounds=num_rounds)
        ledger.check_budget(fingerprint, event, target_epsilon=privacy.target_epsilon,
                            target_delta=privacy.target_delta, accountant=privacy.accountant)
        engine, model, optimizer, loader = private_training(
            module=model, optimizer=optimizer, data_loader=loader, event=event, max_grad_norm=privacy.max_grad_norm,
            accountant=privacy.accountant)

    def proximal_pull() -> None:  # FedProx's proximal gradient, data-independent: no privacy cost
        with torch.no_grad():
            for p, g in zip(unwrap(model).parameters(), global_weights):
                p.sub_(training.lr * training.proximal_mu * (p - g))

    losses = []
    for _ in range(training.local_epochs):
        stats = train_epoch(model, optimizer, loader, device=device,
                            max_physical_batch_size=training.max_physical_batch_size if privacy else None,
                            after_step=proximal_pull if global_weights is not None else None)
        losses.append(stats["loss"])
    metrics: dict[str, Any] = {"num-examples": len(data), "train-loss": losses[-1]}
    if privacy is not None:
        record = ledger.append(run_id=run_id, server_round=server_round, dataset_fingerprint=fingerprint,
                               event=event, max_grad_norm=privacy.max_grad_norm,
                               target_epsilon=privacy.target_epsilon, target_delta=privacy.target_delta,
                               accountant=privacy.accountant)
        metrics.update({"epsilon": record["epsilon"], "delta": privacy.target_delta,
                        "noise-multiplier": event.noise_multiplier, "sample-rate": event.sample_rate,
                        "steps": event.steps})
    return metrics
