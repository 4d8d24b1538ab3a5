"""Where a run's outputs live: shared by the ServerApp and the simulated sites."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


def run_dir(run_config: Mapping[str, Any], run_id: int | str) -> Path:
    """<output-dir>/run-<run id> (output-dir should be absolute: the apps run in Flower's folders)."""
    return Path(str(run_config["output-dir"])).expanduser().absolute() / f"run-{run_id}"
