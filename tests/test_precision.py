"""bf16 autocast (`precision`): under DP the per-sample gradients the optimizer clips are float32,
every clipped per-sample gradient is within max_grad_norm, and the clipped summed step matches the
float32 one up to bfloat16 rounding; ghost clipping is refused with it; "auto" is float32 on a CPU."""

import copy

import pytest
import torch
from conftest import random_batch, tiny_config
from test_ghost import _close, _reference_norms_and_step
from torch.utils.data import DataLoader, TensorDataset

from shared_model.model import Captioner, resolve_precision, train_epoch
from shared_model.privacy import make_private
from shared_model.run_settings import validate_run_config


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = Captioner(cfg)
    images, captions = random_batch(cfg, 8, seed=5)
    norms, _ = _reference_norms_and_step(model, images, captions, max_grad_norm=1.0)
    clip = float(norms.sort().values[3:5].mean())  # half the captions clipped
    return model, images, captions, clip


def _dp_step(model, images, captions, clip, precision):
    model = copy.deepcopy(model)
    loader = DataLoader(TensorDataset(images, captions), batch_size=images.shape[0])
    _, private, optimizer, _ = make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                            data_loader=loader, noise_multiplier=1.0, max_grad_norm=clip)
    optimizer.noise_multiplier = 0.0  # the bare clipped sum
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(private, optimizer, loader, device="cpu", precision=precision)
    change = [p.detach() - b for p, b in zip(model.parameters(), before)]
    return change, optimizer


def test_bf16_dp_step_clips_float32_per_sample_gradients(setup):
    model, images, captions, clip = setup
    _, expected = _reference_norms_and_step(model, images, captions, max_grad_norm=clip)
    change, optimizer = _dp_step(model, images, captions, clip, "bf16")
    # what the optimizer clipped (Opacus keeps the grad samples until the next zero_grad)
    samples = optimizer.grad_samples
    assert samples and all(g.dtype == torch.float32 for g in samples)
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples]).norm(2, dim=0)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (norms > clip).sum() >= 2  # some captions were clipped
    assert torch.all(norms * factors <= clip * (1 + 1e-6))
    # the clipped sum is the float32 one up to bfloat16 rounding of the forward pass (not exact)
    assert _close(change, expected, rel=3e-2)
    fp32, _ = _dp_step(model, images, captions, clip, "fp32")
    assert _close(fp32, expected, rel=1e-5) and not _close(change, expected, rel=1e-5)


def test_bf16_non_private_step_keeps_float32_weights(setup):
    model, images, captions, _ = setup
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_epoch(model, optimizer, [(images, captions)], device="cpu", precision="bf16")
    assert stats["steps"] == 1 and torch.isfinite(torch.tensor(stats["loss"]))
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_precision_resolution_and_refusals():
    assert resolve_precision("auto", "cpu") == "fp32"  # off on a CPU
    assert resolve_precision("bf16", "cpu") == "bf16"  # asked for explicitly
    assert resolve_precision("auto", "cpu", grad_sample_mode="ghost") == "fp32"
    with pytest.raises(ValueError, match="precision 'bf16' cannot run with grad-sample-mode 'ghost'"):
        resolve_precision("bf16", "cpu", grad_sample_mode="ghost")
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', 'auto', got 'fp16'"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of .*got 'half'"):
        validate_run_config({"precision": "half"})
    with pytest.raises(ValueError, match="precision 'bf16' cannot run with grad-sample-mode 'ghost'"):
        validate_run_config({"precision": "bf16", "grad-sample-mode": "ghost"})
    assert validate_run_config({"precision": "auto", "grad-sample-mode": "ghost"})


def test_settings_check_does_not_import_torch():
    """The run-config schema (ServerApp, simulations.run, the settings checks) stays torch-free:
    the precision check lives in shared_model.model.precision, not beside the training loop."""
    import subprocess
    import sys

    code = ("import sys, shared_model.run_settings as s; s.validate_run_config({'precision': 'bf16'}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
