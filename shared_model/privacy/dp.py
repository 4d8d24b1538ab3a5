"""DP-SGD through Opacus: one front door shared by centralized training and the site trainer.

Privacy unit and neighbouring relation: one record (an image with its reference captions) of one
dataset; neighbouring datasets differ by adding or removing one record. Mechanism per step: the
Poisson-subsampled Gaussian mechanism of Opacus (each record joins a batch independently with
probability `sample_rate`; each per-example gradient is clipped to L2 norm `max_grad_norm`; Gaussian
noise of standard deviation `noise_multiplier * max_grad_norm` is added to the sum). `steps` such
steps compose; accounting is done by Opacus's accountant attached to the optimizer, which every
caller names (`accountant`: "prv" is tight and agrees with dp_accounting's PLD; "rdp" is looser but
conservative; a site's default is accounting.DEFAULT_ACCOUNTANT). Opacus's "gdp" accountant
under-reports epsilon and is refused here.

The model's loss must be a per-example mean (see `caption_loss`, model/captioner.py); Opacus's
`loss_reduction="mean"` then recovers each example's own gradient before clipping.

Two ways to get the per-example norms (`grad_sample_mode`), one mechanism and one accounting:
  hooks  Opacus's GradSampleModule materialises every per-example gradient, clips and sums them
         in the optimizer. Works for every decoder; the default.
  ghost  Opacus's ghost / fast gradient clipping: per-example norms from activations and
         backprops without materialising per-example gradients, then a second backward of
         sum_i c_i * loss_i (c_i = min(1, max_grad_norm / norm_i)) yields the clipped sum. The
         loss must go through Opacus's DPLossFastGradientClipping wrapper with one loss per caption
         (`model.training.training_loss` does that). Refused for the LSTM decoder, whose recurrent
         Linear runs at every time step (Opacus: "Parameter tying is not supported").
With noise 0 both give the same clipped, summed gradient (tests/test_ghost.py). The run config also
takes "auto" (`resolve_grad_sample_mode`): ghost where it was measured cheaper, hooks elsewhere.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

from shared_model.privacy.accounting import OPACUS_ACCOUNTANTS, DPSGDEvent

if TYPE_CHECKING:  # torch only for annotations: run_settings imports this module's checks without torch
    from torch import nn
    from torch.optim import Optimizer
    from torch.utils.data import DataLoader

# torch warns on every backward through Opacus's hooks when the images need no gradient: benign.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

GRAD_SAMPLE_MODES = ("hooks", "ghost")
GHOST_DECODERS = ("transformer",)  # the LSTM decoder applies one Linear per time step: ghost refuses it
GRAD_SAMPLE_CHOICES = (*GRAD_SAMPLE_MODES, "auto")  # what the run config accepts


def check_grad_sample_mode(mode: str, *, decoder: str | None = None) -> str:
    """`mode` if it is a grad-sample mode that can train `decoder` (None: any decoder); else
    TypeError/ValueError naming the value."""
    if not isinstance(mode, str):
        raise TypeError(f"grad-sample-mode must be a str, got {type(mode).__name__}")
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad-sample-mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}")
    if mode == "ghost" and decoder is not None and decoder not in GHOST_DECODERS:
        raise ValueError(f"grad-sample-mode 'ghost' cannot train the {decoder!r} decoder: its recurrent Linear "
                         f"runs at every time step, which Opacus's ghost clipping refuses (\"Parameter tying is "
                         f"not supported\"); use grad-sample-mode 'hooks' or decoder {GHOST_DECODERS[0]!r}, "
                         f"got decoder {decoder!r}")
    return mode


def resolve_grad_sample_mode(mode: str, *, decoder: str, trainable: str = "all", precision: str = "fp32") -> str:
    """The mode a site trains with: `mode` itself (checked against `decoder`), or for "auto" ghost
    where it was measured faster and leaner, hooks elsewhere. Ghost when the decoder is the
    transformer, the encoder is frozen (`trainable` "decoder" or "fusion+decoder": the trainable
    layers are then nearly all Linear and Embedding, which Opacus's ghost norms cover) and
    precision is not bf16 (refused with ghost). Hooks when the CNN encoder trains: Opacus 1.6 has no
    ghost norms for Conv2d, so ghost's second backward costs more than it saves (measured on the
    CPU: docs/results.md, "The cost of privacy on the CPU")."""
    if mode == "auto":
        ghost = decoder in GHOST_DECODERS and trainable != "all" and precision != "bf16"
        return "ghost" if ghost else "hooks"
    return check_grad_sample_mode(mode, decoder=decoder)


def check_dp_args(*, max_grad_norm: float, target_delta: float, noise_multiplier: float | None = None,
                  target_epsilon: float | None = None, accountant: str) -> None:
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
                               accountant: str) -> float:
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
                 max_grad_norm: float, accountant: str, grad_sample_mode: str = "hooks",
                 noise_generator=None, poisson_sampling: bool = True):
    """Wrap model, optimizer and loader for DP-SGD with Poisson sampling.

    `grad_sample_mode` "hooks" (per-example gradients) or "ghost" (ghost clipping; the module must
    not be a Captioner with an LSTM decoder, refused here before Opacus sees it). Under ghost the
    optimizer is Opacus's DPOptimizerFastGradientClipping and the loss must go through
    `model.training.training_loss(module, optimizer)`, which `train_epoch` does by itself.
    `noise_generator`: the torch.Generator the noise is drawn from (None: torch's global one).
    `poisson_sampling` False: `data_loader` is already Opacus's DPDataLoader and is used as it is
    (`private_training`). The noise is always drawn as Opacus's secure_mode draws it (the sum of four
    Gaussians, robust to the floating-point attacks on one Gaussian sample: docs/privacy.md).
    Returns (privacy_engine, module, optimizer, data_loader); `privacy_engine.accountant` records
    every optimizer step, including the noise-only steps of empty Poisson batches.
    """
    from opacus import PrivacyEngine

    check_dp_args(max_grad_norm=max_grad_norm, target_delta=0.5, noise_multiplier=noise_multiplier,
                  accountant=accountant)
    from shared_model.model.captioner import unwrap

    config = getattr(unwrap(module), "config", None)
    check_grad_sample_mode(grad_sample_mode, decoder=getattr(config, "decoder", None))
    extra = {}
    if grad_sample_mode == "ghost":
        from shared_model.model.captioner import CaptionLoss

        extra["criterion"] = CaptionLoss()  # Opacus wraps it again; training_loss builds the same wrapper
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=accountant, secure_mode=False)  # secure_mode needs torchcsprng
        wrapped = engine.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=poisson_sampling, grad_sample_mode=grad_sample_mode,
            noise_generator=noise_generator, **extra,
        )
    module, optimizer, data_loader = wrapped[0], wrapped[1], wrapped[-1]
    optimizer.secure_mode = True  # Opacus's floating-point-safe noise, with our generator
    return engine, module, optimizer, data_loader


def plan_dp_sgd(*, num_records: int, batch_size: int, epochs: int, target_delta: float, plan_epochs: int | None = None,
                noise_multiplier: float | None = None, target_epsilon: float | None = None,
                accountant: str) -> DPSGDEvent:
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


def private_training(*, module: nn.Module, optimizer: Optimizer, dataset, event: DPSGDEvent, epochs: int,
                     expected_batch_size: float, max_grad_norm: float, accountant: str,
                     grad_sample_mode: str = "hooks", sampling_generator=None, noise_generator=None):
    """`make_private` for a planned `event` over `dataset`: Opacus's Poisson loader at exactly the
    event's sample rate, taking exactly event.steps / epochs steps per epoch, and the noisy sum
    divided by `expected_batch_size`, a public number (the plan's; Opacus would use
    len(dataset) x rate, which is private). Poisson sampling draws from `sampling_generator` (a CPU
    torch.Generator), the noise from `noise_generator` (on the model's device); None: torch's global
    generator (randomness.py makes both)."""
    from opacus.data_loader import DPDataLoader

    if event.steps % epochs:
        raise ValueError(f"the event's {event.steps} steps are not a whole number per epoch of {epochs} epochs")
    loader = DPDataLoader(dataset, sample_rate=event.sample_rate, generator=sampling_generator)
    loader.batch_sampler.steps = event.steps // epochs  # not int(1 / rate): the plan's steps, exactly
    engine, module, optimizer, loader = make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=event.noise_multiplier,
        max_grad_norm=max_grad_norm, accountant=accountant, grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator, poisson_sampling=False)
    module.forbid_grad_accumulation()  # what make_private does for its own Poisson loaders
    optimizer.expected_batch_size = float(expected_batch_size)
    if abs(loader.sample_rate - event.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus sample_rate {loader.sample_rate} != planned {event.sample_rate}")
    return engine, module, optimizer, loader
