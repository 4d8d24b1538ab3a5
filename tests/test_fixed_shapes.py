"""Fixed-shape physical batches under Poisson sampling: padding rows change nothing but the shape."""

import copy

import pytest
import torch
from conftest import random_batch, tiny_config
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch.utils.data import DataLoader, TensorDataset

from shared_model.model.captioner import Captioner
from shared_model.model.training import pad_batch, train_epoch
from shared_model.privacy.dp import make_private


def _clipped_sum_step(model, images, captions, *, pad_to=None):
    """One DP-SGD step with noise 0 and an active clipping bound; returns the parameters after SGD(lr=1)."""
    module = GradSampleModule(copy.deepcopy(model))
    optimizer = DPOptimizer(torch.optim.SGD(module.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.05,
                            expected_batch_size=8)
    if pad_to:
        images, captions = pad_batch(images, captions, pad_to)
    optimizer.zero_grad(set_to_none=True)
    module(images, captions)[1].backward()
    norms = torch.stack([p.grad_sample.reshape(p.grad_sample.shape[0], -1).norm(dim=1)
                         for p in module.parameters() if p.requires_grad]).norm(dim=0)
    optimizer.step()
    return [p.detach().clone() for p in module.parameters()], norms


def test_padded_batch_gives_the_same_clipped_summed_gradient():
    cfg = tiny_config()
    model = Captioner(cfg)
    images, captions = random_batch(cfg, 5, seed=3)
    plain, plain_norms = _clipped_sum_step(model, images, captions)
    padded, padded_norms = _clipped_sum_step(model, images, captions, pad_to=8)
    assert padded_norms.shape == (8,) and torch.all(padded_norms[5:] == 0)  # masked rows: exactly zero
    assert torch.allclose(padded_norms[:5], plain_norms, rtol=1e-5, atol=1e-7)  # real rows: their own gradient
    assert (plain_norms > 0.05).all()  # the clipping bound is active
    for a, b in zip(plain, padded):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = sum(float((a - p.detach()).abs().sum()) for a, p in zip(plain, model.parameters()))
    assert moved > 0


def test_training_with_fixed_shapes_sees_one_shape_and_counts_only_real_rows():
    cfg = tiny_config()
    images, captions = random_batch(cfg, 60, seed=1)
    model = Captioner(cfg)
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[0]))
    loader = DataLoader(TensorDataset(images, captions), batch_size=12)
    _, private, optimizer, loader = make_private(module=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                 data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, accountant="prv")
    stats = train_epoch(private, optimizer, loader, device="cpu", max_physical_batch_size=16,
                        fixed_batch_shapes=True)
    assert set(shapes) == {16} and stats["steps"] == 5  # Poisson batches of any size, one shape
    assert 0 < stats["examples"] <= 100 and stats["loss"] > 0  # Poisson: about 60 (5 steps at rate 1/5)
    with pytest.raises(ValueError, match="larger than the fixed size"):
        pad_batch(images[:20], captions[:20], 16)
