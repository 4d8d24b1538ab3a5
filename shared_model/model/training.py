"""One local training epoch, private or not; no Flower, no accounting (Opacus hooks do that).

The loss is the model's per-caption mean loss; under Opacus's ghost clipping (grad-sample-mode
"ghost") the same loss goes through `training_loss`, Opacus's wrapper whose `backward()` clips per
caption."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .precision import resolve_precision


def pad_batch(images: torch.Tensor, captions: torch.Tensor, size: int, pad_id: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a physical batch to `size` rows with masked rows: zero images and captions of `pad_id`
    only. caption_loss gives such a row a loss of exactly 0 (no tokens), so its gradient, its
    per-sample norm and its share of the clipped sum are exactly 0, while the per-caption mean over
    `size` rows is what Opacus's loss_reduction="mean" rescales by: real rows keep their own
    gradients. Poisson sampling (and so the accounting) is unchanged; only the shapes are fixed."""
    n = images.shape[0]
    if n > size:
        raise ValueError(f"physical batch of {n} rows is larger than the fixed size {size}")
    if n == size:
        return images, captions
    images = torch.cat([images, images.new_zeros((size - n, *images.shape[1:]))])
    captions = torch.cat([captions, captions.new_full((size - n, *captions.shape[1:]), pad_id)])
    return images, captions


def is_ghost(optimizer: Optimizer) -> bool:
    """True for Opacus's ghost / fast-gradient-clipping optimizer (make_private(grad_sample_mode="ghost"))."""
    if not hasattr(optimizer, "noise_multiplier"):
        return False
    from opacus.optimizers import DPOptimizerFastGradientClipping

    return isinstance(optimizer, DPOptimizerFastGradientClipping)


def training_loss(model: nn.Module, optimizer: Optimizer) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """The loss (logits [B, T, V], targets [B, T]) -> loss to call `.backward()` on.

    Hooks mode and non-private training: `caption_loss`, the batch mean of per-caption means.
    Ghost mode: Opacus's DPLossFastGradientClipping around `CaptionLoss`; it takes one loss per
    caption (the mean over that caption's own tokens, as in hooks mode, so clipping sees the same
    per-example gradient) and its `backward()` runs the two passes: norms from the batch mean,
    then the gradient of sum_i min(1, max_grad_norm / norm_i) * loss_i, i.e. the clipped sum. A plain
    `loss.backward()` under ghost would leave the unclipped mean gradient for the optimizer to noise."""
    from .captioner import CaptionLoss

    if not is_ghost(optimizer):
        return CaptionLoss()
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    return DPLossFastGradientClipping(model, optimizer, CaptionLoss(), loss_reduction="mean")


def float32_grad_samples(model: nn.Module) -> None:
    """Upcast the per-sample gradients that Opacus's hooks left in bfloat16 (layers run under bf16
    autocast) to float32, before the optimizer clips them: the per-sample norm, the clipping factor
    and the clipped sum are then computed in float32 from the very vector that is summed, so every
    clipped gradient has norm <= max_grad_norm up to float32 rounding, as in fp32 training. (A norm
    taken in bfloat16 is off by up to 2**-8 relative, so the clip would not bound the norm.)"""
    for p in model.parameters():
        g = getattr(p, "grad_sample", None)
        if isinstance(g, torch.Tensor) and g.dtype != torch.float32:
            p.grad_sample = g.float()
        elif isinstance(g, list):
            p.grad_sample = [x.float() for x in g]


def noise_only_step(optimizer: Optimizer) -> None:
    """The DP step of an empty Poisson batch under ghost clipping (Opacus's ghost module cannot run
    a batch of 0 rows): a zero clipped sum, so the optimizer adds only noise, and the accountant
    counts the step as in hooks mode."""
    for p in optimizer.params:
        p.grad = torch.zeros_like(p)
    optimizer.step()


def train_epoch(model: nn.Module, optimizer: Optimizer, data_loader: DataLoader, *, device: torch.device | str,
                max_physical_batch_size: int | None = None, log: Callable[[str], None] | None = None,
                log_every: int = 0, after_step: Callable[[], None] | None = None,
                fixed_batch_shapes: bool = False, precision: str = "fp32") -> dict[str, float]:
    """One pass over `data_loader`. With an Opacus optimizer and `max_physical_batch_size`, logical
    batches are split by BatchMemoryManager (the optimizer only steps at logical batch ends); with
    `fixed_batch_shapes` every physical batch is padded to `max_physical_batch_size` masked rows
    (`pad_batch`), so a GPU sees one shape instead of a new one per Poisson batch.
    `after_step` runs after every real optimizer step (e.g. FedProx's pull to the global weights).
    `precision` "bf16" runs the forward pass and the loss under bf16 autocast (weights, optimizer
    state and the loss stay float32); under DP the per-sample gradients are upcast to float32
    before clipping (`float32_grad_samples`); "auto" resolves through `resolve_precision`.
    Returns the mean per-caption loss over examples, examples seen and optimizer steps."""
    if fixed_batch_shapes and not max_physical_batch_size:
        raise ValueError("fixed_batch_shapes needs max_physical_batch_size (the fixed size)")
    model.train()
    is_private = hasattr(optimizer, "noise_multiplier")
    ghost = is_ghost(optimizer)
    bf16 = resolve_precision(precision, device, grad_sample_mode="ghost" if ghost else "hooks") == "bf16"
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    criterion = training_loss(model, optimizer) if ghost else None
    if is_private and max_physical_batch_size:
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        ctx = BatchMemoryManager(data_loader=data_loader, max_physical_batch_size=max_physical_batch_size,
                                 optimizer=optimizer)
    else:
        ctx = nullcontext(data_loader)
    total, examples, steps = 0.0, 0, 0
    with ctx as loader:
        for i, (images, captions) in enumerate(loader):
            images, captions = images.to(device, non_blocking=True), captions.to(device, non_blocking=True)
            n = images.shape[0]
            if fixed_batch_shapes:
                images, captions = pad_batch(images, captions, max_physical_batch_size)
            optimizer.zero_grad(set_to_none=True)
            if ghost and images.shape[0] == 0:
                noise_only_step(optimizer)
                loss_report = torch.zeros(())
            else:
                with autocast:
                    logits, loss = model(images, captions)
                if ghost:  # the same per-caption loss, one value per caption, through Opacus's wrapper
                    loss = criterion(logits, captions[:, 1:])
                loss_report = loss.detach()
                if fixed_batch_shapes and n:
                    loss_report = loss_report * images.shape[0] / n  # the mean over real rows
                loss.backward()
                if bf16 and is_private:
                    float32_grad_samples(model)
                optimizer.step()
            skipped = is_private and getattr(optimizer, "_is_last_step_skipped", False)
            if not skipped:
                steps += 1
                if after_step is not None:
                    after_step()
            total += float(loss_report) * n
            examples += n
            if log and log_every and (i + 1) % log_every == 0:
                log(f"  batch {i + 1}: loss {float(loss_report):.3f}")
    return {"loss": total / max(examples, 1), "examples": examples, "steps": steps}
