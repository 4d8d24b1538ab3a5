"""One local training epoch, private or not; no Flower, no accounting (Opacus hooks do that)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader


def train_epoch(model: nn.Module, optimizer: Optimizer, data_loader: DataLoader, *, device: torch.device | str,
                max_physical_batch_size: int | None = None, log: Callable[[str], None] | None = None,
                log_every: int = 0, after_step: Callable[[], None] | None = None) -> dict[str, float]:
    """One pass over `data_loader`. With an Opacus optimizer and `max_physical_batch_size`, logical
    batches are split by BatchMemoryManager (the optimizer only steps at logical batch ends).
    `after_step` runs after every real optimizer step (e.g. FedProx's pull to the global weights).
    Returns the mean per-caption loss over examples, examples seen and optimizer steps."""
    model.train()
    is_private = hasattr(optimizer, "noise_multiplier")
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
            optimizer.zero_grad(set_to_none=True)
            _, loss = model(images, captions)
            loss.backward()
            optimizer.step()
            skipped = is_private and getattr(optimizer, "_is_last_step_skipped", False)
            if not skipped:
                steps += 1
                if after_step is not None:
                    after_step()
            n = images.shape[0]
            total += float(loss.detach()) * n
            examples += n
            if log and log_every and (i + 1) % log_every == 0:
                log(f"  batch {i + 1}: loss {float(loss):.3f}")
    return {"loss": total / max(examples, 1), "examples": examples, "steps": steps}
