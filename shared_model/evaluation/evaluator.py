"""Caption generation and evaluation of a model on a CaptionSet (loss + caption metrics)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from shared_model.data.datasets import CaptionPairs, image_tensor
from .metrics import caption_metrics
from shared_model.data.records import CaptionSet
from shared_model.data.vocab import Vocabulary
from shared_model.model.captioner import caption_loss


def decoding(beam_size: int) -> str:
    """How captions were decoded, in the words every printed score carries (a score depends on it)."""
    return "greedy decoding (beam 1)" if int(beam_size) == 1 else f"beam search (beam {int(beam_size)})"


@torch.no_grad()
def generate_captions(model: nn.Module, data: CaptionSet, vocab: Vocabulary, *, beam_size: int = 1,
                      batch_size: int = 128, device: torch.device | str = "cpu") -> dict[str, str]:
    """image id -> generated caption."""
    model.eval()
    out: dict[str, str] = {}
    for start in range(0, len(data), batch_size):
        images = image_tensor(data.images[start: start + batch_size]).to(device)
        rows = model.generate(images, beam_size=beam_size).tolist()
        for image_id, row in zip(data.image_ids[start: start + batch_size], rows):
            out[image_id] = vocab.decode(row)
    return out


@torch.no_grad()
def mean_caption_loss(model: nn.Module, data: CaptionSet, vocab: Vocabulary, *, batch_size: int = 128,
                      device: torch.device | str = "cpu") -> float:
    """Per-caption loss averaged over every (image, reference) pair."""
    model.eval()
    pairs = CaptionPairs(data, vocab, max_len=model.config.max_len)
    total = 0.0
    for images, captions in DataLoader(pairs, batch_size=batch_size):
        images, captions = images.to(device), captions.to(device)
        logits, _ = model(images, captions)
        total += float(caption_loss(logits, captions[:, 1:], reduction="none").sum())
    return total / len(pairs)


def evaluate(model: nn.Module, data: CaptionSet, vocab: Vocabulary, *, beam_size: int = 1, batch_size: int = 128,
             device: torch.device | str = "cpu", meteor: bool = True) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics incl. "loss", generated captions)."""
    predictions = generate_captions(model, data, vocab, beam_size=beam_size, batch_size=batch_size, device=device)
    metrics = caption_metrics(predictions, data.references(), meteor=meteor)
    metrics["loss"] = mean_caption_loss(model, data, vocab, batch_size=batch_size, device=device)
    return metrics, predictions
