"""Training precision (`precision`: fp32 | bf16 | auto), checked without importing torch so that
settings validation stays light; `model.training.train_epoch` applies it."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "auto")


def check_precision(precision: str, *, grad_sample_mode: str = "hooks") -> str:
    """`precision`, or ValueError naming it. "bf16" with grad-sample-mode "ghost" is refused:
    Opacus computes ghost norms in the activations' dtype, and a norm rounded to bfloat16 (8 bits
    of mantissa) can let a clipped gradient exceed max-grad-norm, which would break the sensitivity
    the accounting assumes."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(repr(p) for p in PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and grad_sample_mode == "ghost":
        raise ValueError("precision 'bf16' cannot run with grad-sample-mode 'ghost': Opacus computes ghost "
                         "per-caption norms in bfloat16, too coarse to bound the clipped norm; use "
                         "grad-sample-mode 'hooks' or precision 'fp32'")
    return precision


def resolve_precision(precision: str, device, *, grad_sample_mode: str = "hooks") -> str:
    """"fp32" or "bf16" for `precision` on `device`. "auto": bf16 on a CUDA device that has it, fp32
    elsewhere and under ghost clipping. On a CPU bf16 stays opt-in: its speed depends on the CPU's
    bf16 units (the development CPU ran a DP step 9% faster, a whole site round no faster:
    docs/results.md), and it changes the numbers a site trains with."""
    check_precision(precision, grad_sample_mode=grad_sample_mode)
    if precision != "auto":
        return precision
    import torch

    device = torch.device(device)
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if cuda_bf16 and grad_sample_mode != "ghost" else "fp32"
