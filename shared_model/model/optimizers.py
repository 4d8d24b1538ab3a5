"""A site's local optimizer by name (run-config `optimizer`). Each round builds a fresh one: no
optimizer state crosses rounds, so nothing a site learned in an earlier round travels in it.

Under DP-SGD the optimizer only post-processes the noised, clipped gradient Opacus hands it, so its
choice costs no privacy; it changes how much of the noise reaches the weights. AdamW scales each
coordinate by its own running gradient magnitude, which amplifies the noise where the signal is
small; SGD with momentum moves every coordinate by the same rule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:  # torch only when an optimizer is built: the settings schema reads OPTIMIZERS
    from torch import nn
    from torch.optim import Optimizer

OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9


def make_optimizer(name: str, params: Iterable["nn.Parameter"], *, lr: float) -> "Optimizer":
    """The optimizer `name` (one of OPTIMIZERS) over `params` at learning rate `lr`."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
