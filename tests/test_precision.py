"""bf16 autocast (`precision`): under DP the per-sample gradients the optimizer clips are float32,
every clipped per-sample gradient is within max_grad_norm, and the clipped summed step matches the
float32 one up to bfloat16 rounding; ghost clipping is refused with it; "auto" is float32 on a CPU."""

import copy

import pytest
import test_ghost
import torch
from test_ghost import _close, _dp_step, _reference_norms_and_step

from shared_model.model.precision import resolve_precision
from shared_model.model.training import train_epoch
from shared_model.run_settings import default_run_config, validate_run_config

setup = test_ghost.setup  # the same model, batch and clip (half the captions clipped)


def test_bf16_dp_step_clips_float32_per_sample_gradients(setup):
    model, images, captions, clip = setup
    _, expected = _reference_norms_and_step(model, images, captions, max_grad_norm=clip)
    change, _, _, private = _dp_step("hooks", model, images, captions, max_grad_norm=clip, precision="bf16")
    # what the optimizer clipped (Opacus keeps the grad samples until the next zero_grad)
    samples = [p.grad_sample for p in private.parameters() if p.requires_grad]
    assert samples and all(g.dtype == torch.float32 for g in samples)
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in samples]).norm(2, dim=0)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (norms > clip).sum() >= 2  # some captions were clipped
    assert torch.all(norms * factors <= clip * (1 + 1e-6))
    # the clipped sum is the float32 one up to bfloat16 rounding of the forward pass (not exact)
    assert _close(change, expected, rel=3e-2)
    fp32, *_ = _dp_step("hooks", model, images, captions, max_grad_norm=clip)
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
        validate_run_config({**default_run_config(), "precision": "half"})
    with pytest.raises(ValueError, match="precision 'bf16' cannot run with grad-sample-mode 'ghost'"):
        validate_run_config({**default_run_config(), "precision": "bf16", "grad-sample-mode": "ghost"})
    # "auto" with ghost is allowed and kept as given (it resolves to float32 on a CPU, above)
    rc = validate_run_config({**default_run_config(), "precision": "auto", "grad-sample-mode": "ghost"})
    assert (rc["precision"], rc["grad-sample-mode"]) == ("auto", "ghost")


def test_settings_check_does_not_import_torch():
    """The run-config schema (ServerApp, simulations.run, the settings checks) stays torch-free:
    the precision check lives in shared_model.model.precision, not beside the training loop."""
    import subprocess
    import sys

    code = ("import sys, shared_model.run_settings as s; s.validate_run_config({**s.default_run_config(), 'precision': 'bf16'}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
