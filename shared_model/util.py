"""Small helpers every output writer shares: JSON-safe values, UTC timestamps, durations, atomic file writes."""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (inf, nan), at any depth of dicts and lists, as a string."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def utc_now() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def estimate(elapsed: float, done: float, total: float) -> str:
    """'elapsed 1 min 02 s, about 30 s left' (no estimate before the first unit is done)."""
    text = f"elapsed {duration(elapsed)}"
    if 0 < done < total:
        text += f", about {duration(elapsed / done * (total - done))} left"
    return text


def atomic_replace(tmp: str | Path, path: str | Path) -> None:
    """fsync the finished file `tmp`, rename it over `path`, fsync the folder: a crash leaves the old
    file or the new one, never a torn one. Every file FedCap must not lose (ledger, membership,
    identities, federation state, checkpoints and their pointers, data store) is written through here."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(Path(path).parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name (safetensors, numpy);
    committed with `atomic_replace` when the block ends without an error, removed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield Path(tmp)
        atomic_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
