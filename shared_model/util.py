"""Two small helpers every output writer shares: JSON-safe values and UTC timestamps."""

from __future__ import annotations

import math
import time
from typing import Any


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
