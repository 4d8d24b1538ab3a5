"""The main job's public starting point: pretrain on the embedded public variant (cached), start the
federation from it (`init-from`), and put the public-only score beside the federated result.
The public variant is the run config's `data-scenario`'s: in the shifted scenario, the public
population that rarely or never shows the sites' own content (shared_model/data/public.py); the
scenario is part of the cached settings (the pretraining source).

The pretrained model is built from the run config's model keys (so the sites' models fit it) with
the pretraining defaults of runners/pretrain.py; its checkpoint is cached under
.fedcap/pretrained/<settings hash>/ and reused while those settings are unchanged. Pretraining
touches no site's records: it spends no site privacy budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from shared_model.model.config import RUN_CONFIG_KEYS
from runners.flower_runtime import ROOT

CACHE = ROOT / ".fedcap" / "pretrained"
COMPARED = ("BLEU-4", "ROUGE-L", "CIDEr-D")


def model_overrides(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """CaptionerConfig fields from the run config's model keys ("" encoder weights = none)."""
    out = {}
    for key, field in RUN_CONFIG_KEYS.items():
        if key in run_config:
            value = run_config[key]
            out[field] = None if field == "encoder_weights" and value == "" else value
    return out


def pretrain_for(run_config: Mapping[str, Any], *, cache: Path = CACHE, log: Callable[[str], None] = print,
                 **overrides: Any) -> tuple[Path, dict]:
    """(checkpoint, pretraining result) for the model the run config describes; cached."""
    from runners.pretrain import cached_pretrain, pretrain_config
    from runners.sources import public_source

    base = {"model": model_overrides(run_config), "seed": int(run_config["seed"]),
            "test_size": int(run_config["server-eval-size"]),
            "source": public_source(str(run_config["data-scenario"]))}
    cfg = pretrain_config(**{**base, **overrides})
    return cached_pretrain(cfg, cache, log=log)


def comparison(run_dir: Path, public: Mapping[str, Any]) -> str:
    """Markdown: the public-only model (round 0 on the server's evaluation set, and its own
    pretraining score) beside the federated model of the last round."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        return ""
    first, last = rows[0], rows[-1]
    eps = last.get("max-site-epsilon")
    federated = f"federated, round {last['round']}"
    if isinstance(eps, float):
        federated += f" (max site epsilon {eps:.2f})"
    when = "reused from the cache" if public.get("reused") else "trained in this run"
    lines = ["## Public pretraining vs federated fine-tuning (server evaluation set)", "",
             "| model | " + " | ".join(COMPARED) + " |", "|---" * (len(COMPARED) + 1) + "|",
             "| public only (pretrained, round 0) | " + " | ".join(f"{first[k]:.4f}" for k in COMPARED) + " |",
             f"| {federated} | " + " | ".join(f"{last[k]:.4f}" for k in COMPARED) + " |", "",
             f"Public pretraining ({when}; {public.get('seconds', 0):.0f} s when trained): non-private, public data "
             "only, no site privacy budget spent.", ""]
    return "\n".join(lines)


def append_comparison(run_dir: Path, public: Mapping[str, Any]) -> str:
    text = comparison(run_dir, public)
    summary = run_dir / "summary.md"
    if text and summary.is_file():
        summary.write_text(summary.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + text, encoding="utf-8")
    return text
