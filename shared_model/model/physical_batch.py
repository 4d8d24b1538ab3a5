"""`max-physical-batch-size = "auto"`: the largest physical batch whose step fits a memory budget.

Under DP-SGD a logical (Poisson) batch is split into physical batches that are processed one after
another before the one noisy step (Opacus's BatchMemoryManager); the physical size changes memory
and speed only: which records are sampled, the clipping, the noise and so the accounting are the
same for any physical size. A short probe measures what one example adds to a step: the tensors
autograd saves for backward in a forward pass of 1 and of 2 examples (torch's saved-tensor hooks),
counted twice under DP (Opacus keeps each layer's input and output gradient beside autograd's),
plus, with Opacus's hooks, a per-example gradient of every trainable parameter (ghost clipping keeps
none). The physical batch is the largest that fits `budget` bytes (devices.memory_budget), at
least 1 and at most `cap`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _saved_bytes(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> int:
    total = 0

    def pack(t: torch.Tensor) -> Any:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return total


def bytes_per_example(module: nn.Module, example: tuple[torch.Tensor, ...], *, grad_sample_mode: str | None
                      ) -> int:
    """What one more example adds to a training step of `module` (the plain model, not Opacus's
    wrapper) on `example` (one item: its tensors without the batch dimension); `grad_sample_mode`
    "hooks" or "ghost" under DP, None without."""
    device = next(module.parameters()).device
    one = tuple(t.unsqueeze(0).to(device) for t in example)
    two = tuple(torch.cat([t, t]) for t in one)
    activations = max(_saved_bytes(module, two) - _saved_bytes(module, one), 0)
    if grad_sample_mode is None:
        return activations
    grads = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return 2 * activations + (grads if grad_sample_mode == "hooks" else 0)


def physical_batch_size(module: nn.Module, example: tuple[torch.Tensor, ...], *, budget: int, cap: int,
                        grad_sample_mode: str | None) -> tuple[int, int]:
    """(the physical batch size for `budget` bytes, the probe's bytes per example)."""
    per_example = bytes_per_example(module, example, grad_sample_mode=grad_sample_mode)
    fits = budget // per_example if per_example else cap
    return max(1, min(cap, int(fits))), per_example


def describe(size: int, per_example: int, budget: int) -> str:
    return (f"physical batch {size} ({per_example / 2**20:.2f} MiB per example, budget "
            f"{budget / 2**30:.2f} GiB, about {math.ceil(size * per_example / 2**20)} MiB per step)")
