"""Where a site trains (node_config `device`) and how much memory a step may take there."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch when a device is resolved: the settings schema reads DEVICE_PATTERN
    import torch

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def resolve_device(name: str) -> "torch.device":
    """"auto" (the first GPU when there is one, else the CPU), "cpu", "cuda" or "cuda:N";
    ValueError naming the device when it is malformed or not on this machine."""
    import torch

    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def memory_budget(device: "torch.device", *, limit_bytes: int | None = None) -> int:
    """Bytes one training step may take: on a GPU its free memory (or `limit_bytes`, whichever is
    smaller), less a tenth for the allocator; on the CPU `limit_bytes` (node_config memory-limit),
    else half of the memory the kernel reports available."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.9)
        return budget if limit_bytes is None else min(budget, limit_bytes)
    if limit_bytes is not None:
        return limit_bytes
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available // 2
