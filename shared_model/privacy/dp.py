"""DP-SGD through Opacus: one front door shared by centralized training and the site trainer.

Privacy unit and neighbouring relation: one record (an image with its reference captions) of one
dataset; neighbouring datasets differ by adding or removing one record. Mechanism per step: the
Poisson-subsampled Gaussian mechanism of Opacus (each record joins a batch independently with
probability `sample_rate`; each per-example gradient is clipped to L2 norm `max_grad_norm`; Gaussian
noise of standard deviation `noise_multiplier * max_grad_norm` is added to the sum). `steps` such
steps compose; accounting is done by Opacus's accountant attached to the optimizer ("prv" by
default: tight, and agrees with dp_accounting's PLD; "rdp" is looser but conservative). Opacus's
"gdp" accountant under-reports epsilon and is refused here.

The model's loss must be a per-example mean (see `model.caption_loss`); Opacus's
`loss_reduction="mean"` then recovers each example's own gradient before clipping.
"""

from __future__ import annotations

import math
import warnings

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .accounting import OPACUS_ACCOUNTANTS, DPSGDEvent

# torch warns on every backward through Opacus's hooks when the images need no gradient: benign.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def check_dp_args(*, max_grad_norm: float, target_delta: float, noise_multiplier: float | None = None,
                  target_epsilon: float | None = None, accountant: str = "prv") -> None:
    """Raise ValueError naming the first bad DP setting."""
    if accountant not in OPACUS_ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {OPACUS_ACCOUNTANTS}, got {accountant!r}")
    if not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if noise_multiplier is None and target_epsilon is None:
        raise ValueError("give noise_multiplier or target_epsilon")
    if noise_multiplier is not None and not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if target_epsilon is not None and not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")


def poisson_plan(*, num_records: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample_rate, steps) of `epochs` epochs under Opacus's Poisson loader, which samples at
    rate 1 / len(loader) = 1 / ceil(num_records / batch_size) and takes that many steps per epoch."""
    if num_records < 1 or batch_size < 1 or epochs < 1:
        raise ValueError(f"num_records, batch_size and epochs must be >= 1, got {num_records}, {batch_size}, {epochs}")
    batches = math.ceil(num_records / batch_size)
    return 1.0 / batches, epochs * batches


def calibrate_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv") -> float:
    """Smallest noise multiplier whose `steps`-fold composition of the Poisson-sampled Gaussian
    (rate `sample_rate`) stays within (target_epsilon, target_delta) under `accountant`.

    `steps` must be the whole plan (every epoch of every round that will ever touch the data),
    not one round: calibrating per round lets the true epsilon grow with the number of rounds.
    """
    from opacus.accountants.utils import get_noise_multiplier

    check_dp_args(max_grad_norm=1.0, target_delta=target_delta, target_epsilon=target_epsilon, accountant=accountant)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with warnings.catch_warnings():  # Opacus's RDP search warns when the best order is at the edge
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


def make_private(*, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader, noise_multiplier: float,
                 max_grad_norm: float, accountant: str = "prv", secure_mode: bool = False):
    """Wrap model, optimizer and loader for DP-SGD with Poisson sampling (hooks grad-sample mode).

    Returns (privacy_engine, module, optimizer, data_loader); `privacy_engine.accountant` records
    every optimizer step, including the noise-only steps of empty Poisson batches.
    """
    from opacus import PrivacyEngine

    check_dp_args(max_grad_norm=max_grad_norm, target_delta=0.5, noise_multiplier=noise_multiplier,
                  accountant=accountant)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
        module, optimizer, data_loader = engine.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
        )
    return engine, module, optimizer, data_loader


def plan_dp_sgd(*, num_records: int, batch_size: int, epochs: int, target_delta: float, plan_epochs: int | None = None,
                noise_multiplier: float | None = None, target_epsilon: float | None = None,
                accountant: str = "prv") -> DPSGDEvent:
    """The DP-SGD event of `epochs` epochs over `num_records` records in Poisson batches of expected
    size `batch_size`, fixed before any data is touched. The noise multiplier is `noise_multiplier`,
    or the smallest one whose `plan_epochs` epochs (the whole plan; default `epochs`) stay within
    (target_epsilon, target_delta) under `accountant`."""
    sample_rate, steps = poisson_plan(num_records=num_records, batch_size=batch_size, epochs=epochs)
    if noise_multiplier is None:
        plan_steps = steps if plan_epochs is None else poisson_plan(
            num_records=num_records, batch_size=batch_size, epochs=plan_epochs)[1]
        noise_multiplier = calibrate_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                                      sample_rate=sample_rate, steps=plan_steps,
                                                      accountant=accountant)
    return DPSGDEvent(sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps)


def private_training(*, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader, event: DPSGDEvent,
                     max_grad_norm: float, accountant: str = "prv"):
    """`make_private` for a planned `event`; refuses a loader whose Poisson rate is not the event's."""
    engine, module, optimizer, data_loader = make_private(
        module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=event.noise_multiplier,
        max_grad_norm=max_grad_norm, accountant=accountant)
    if abs(data_loader.sample_rate - event.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus sample_rate {data_loader.sample_rate} != planned {event.sample_rate}")
    return engine, module, optimizer, data_loader


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model inside an Opacus GradSampleModule (its state_dict keys carry `_module.`)."""
    return getattr(module, "_module", module)
