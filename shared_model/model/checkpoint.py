"""Checkpoints: a folder with model.safetensors, config.json (model config + metadata), vocab.json.

Files are written to temporary names and moved into place, so an interrupted save never leaves a
half-written file under a checkpoint name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from shared_model.data.vocab import Vocabulary
from shared_model.util import atomic_file, atomic_write

from .captioner import Captioner, unwrap
from .config import CaptionerConfig

WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the plain model (an Opacus wrapper's `_module.` prefix removed), contiguous on CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}


def save_checkpoint(directory: str | Path, model: nn.Module, vocab: Vocabulary,
                    metadata: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: CaptionerConfig = unwrap(model).config
    if config.vocab_size != len(vocab):
        raise ValueError(f"model vocab_size {config.vocab_size} != vocabulary size {len(vocab)}")
    doc = {"format": "fedcap-checkpoint/1", "model": config.to_dict(), "metadata": metadata or {}}
    with atomic_file(directory / WEIGHTS) as tmp:
        save_file(model_state(model), tmp)
    with atomic_file(directory / VOCAB) as tmp:
        vocab.save(tmp)
    atomic_write(directory / CONFIG, json.dumps(doc, indent=2, sort_keys=True).encode("utf-8"))
    return directory


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or ValueError naming the file and what is wrong with it
    (empty, truncated, not safetensors)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint weights {path} are empty (0 bytes)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError (and OSError for a short read)
        raise ValueError(f"checkpoint weights {path} ({size} bytes) are corrupt or truncated: "
                         f"{type(e).__name__}: {e}") from None


def load_checkpoint(directory: str | Path, *, device: torch.device | str = "cpu"
                    ) -> tuple[Captioner, Vocabulary, dict[str, Any]]:
    """-> (model in eval mode, vocabulary, metadata). The encoder-weights file named in the config
    is not needed: the checkpoint holds every weight."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, VOCAB):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no {name}")
    try:
        doc = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint config {directory / CONFIG} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != "fedcap-checkpoint/1":
        raise ValueError(f"{directory / CONFIG} is not a FedCap checkpoint config (format 'fedcap-checkpoint/1')")
    if not isinstance(doc.get("model"), dict):
        raise ValueError(f"checkpoint config {directory / CONFIG} has no \"model\" object, got {doc.get('model')!r}")
    try:
        config = CaptionerConfig.from_dict({**doc["model"], "encoder_weights": None})
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint config {directory / CONFIG}: invalid \"model\": {e}") from None
    vocab = Vocabulary.load(directory / VOCAB)
    if config.vocab_size != len(vocab):
        raise ValueError(f"checkpoint {directory}: model vocab_size {config.vocab_size} != vocabulary size {len(vocab)}")
    model = Captioner(config)
    state = _read_weights(directory / WEIGHTS)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint weights {directory / WEIGHTS} do not match its config: {e}") from e
    return model.to(device).eval(), vocab, doc.get("metadata", {})


def checkpoint_sha256(directory: str | Path) -> str:
    """SHA-256 (hex) of a checkpoint's weights file: what a run started from, for ledgers and audits."""
    import hashlib

    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {directory} has no {WEIGHTS}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
