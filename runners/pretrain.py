"""Public pretraining: non-private centralized training on public data, the checkpoint federations
fine-tune under DP (`init-from`).

It touches no site's records, so it spends no site privacy budget; the privacy guarantee of the
federation is about the sites' records only, given this public starting point. Defaults are sized
for the 2-core main job (its time: docs/results.md, "The main job"): 20,000 public scenes (the embedded
generator's public variant), 6 epochs, batch 64, lr 3e-3 with cosine decay, scored on the embedded
test split the federation's server also uses.

`cached_pretrain` keeps one checkpoint per distinct setting under
<root>/<sha-256 of the settings, 16 hex>/ and reuses it while the settings are unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from .centralized import DP_ONLY, CentralizedConfig, run_centralized

NO_BUDGET = "public pretraining: non-private, on public data only; it spends no site privacy budget"
PRETRAIN_DEFAULTS = dict(source="public", train_size=20_000, epochs=6, batch_size=64, lr=3e-3,
                         lr_schedule="cosine", meteor=False, kind="pretrained")
CACHE_FORMAT = "fedcap-pretrain/1"  # bump when the pretraining code changes what a setting produces


def pretrain_config(**overrides: Any) -> CentralizedConfig:
    """The pretraining settings: PRETRAIN_DEFAULTS with `overrides`; never private."""
    cfg = CentralizedConfig(**{**PRETRAIN_DEFAULTS, **overrides})
    if cfg.dp:
        raise ValueError("pretraining is non-private by definition (public data), got dp=True")
    return cfg


def run_pretrain(cfg: CentralizedConfig, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict:
    """Train, write <out>/checkpoint (weights, config, vocabulary) and say that no budget was spent."""
    if cfg.dp:
        raise ValueError("pretraining is non-private by definition (public data), got dp=True")
    log(NO_BUDGET)
    result = run_centralized(cfg, out_dir, log=log)
    log(NO_BUDGET)
    return result


def settings_hash(cfg: CentralizedConfig) -> str:
    """16 hex digits of the SHA-256 of everything that decides the pretrained weights."""
    from shared_model.model.config import CaptionerConfig

    # pretraining is never private: DP settings decide nothing
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "meteor", *DP_ONLY)}
    # added after caches existed: no folder or one folder keeps the hash it had as a string
    settings["data"] = "" if not cfg.data else cfg.data[0] if len(cfg.data) == 1 else cfg.data
    # the model as it will be built, so overrides that restate a default give the same checkpoint
    resolved = CaptionerConfig(vocab_size=5, **cfg.model).to_dict()
    settings["model"] = {k: v for k, v in resolved.items() if k != "vocab_size"}  # the data decides it
    if settings.get("precision") == "fp32":  # added after caches existed: fp32 weights keep their hash
        del settings["precision"]
    text = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_pretrain(cfg: CentralizedConfig, root: str | Path, *, log: Callable[[str], None] = print
                    ) -> tuple[Path, dict]:
    """(checkpoint folder, metrics) of `cfg`, trained once into <root>/<settings hash>/."""
    out = Path(root) / settings_hash(cfg)
    metrics_path, checkpoint = out / "metrics.json", out / "checkpoint"
    if metrics_path.is_file() and (checkpoint / "model.safetensors").is_file():
        log(f"public pretraining: reusing {checkpoint} (settings unchanged; no site budget spent)")
        return checkpoint, {**json.loads(metrics_path.read_text()), "reused": True}
    return checkpoint, run_pretrain(cfg, out, log=log)
