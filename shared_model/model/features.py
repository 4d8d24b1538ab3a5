"""Training from encoder features computed once, when the encoder does not train.

With `trainable` "decoder" or "fusion+decoder" the encoder (backbone and its projection to
d_model) is frozen, so its output grid [G, D] for an image is a fixed function of that image and the
encoder's weights. `encode_rows` computes it for every record once, in eval mode (a frozen BatchNorm
uses its pretrained statistics; no dropout), and `FromFeatures` trains the rest of the captioner from
those grids: its forward is the captioner's teacher forcing after the encoder, over the same
parameters, so an optimizer step changes exactly what the same step from images would.

Privacy: a record's grid is a function of that record alone and of public weights (the global
model the server sent), so training from it is the same DP mechanism over the same records (one
item per record, Poisson sampling, per-record clipping and noise) as training from the images; the
grids stay at the site (client/feature_cache.py) and cost no privacy. `encoder_fingerprint` names
the weights and the image size a set of grids belongs to, so a changed encoder never reuses them.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .captioner import Captioner, caption_loss


class FromFeatures(nn.Module):
    """forward(grid [B, G, D], captions [B, T]) -> (logits [B, T-1, V], loss), as
    `Captioner.forward` is from images; the wrapped captioner's parameters are its parameters."""

    def __init__(self, captioner: Captioner) -> None:
        super().__init__()
        self.captioner = captioner

    @property
    def config(self):
        return self.captioner.config

    def forward(self, grid: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        model = self.captioner
        logits, _ = model.step(captions[:, :-1].contiguous(), model.start_from_grid(grid))
        return logits, caption_loss(logits, captions[:, 1:])


def grid_shape(model: Captioner) -> tuple[int, int]:
    """(G, D) of the encoder's output for this model's image size."""
    size = model.config.image_size
    with torch.no_grad():
        was = model.encoder.training
        model.encoder.eval()
        try:
            probe = torch.zeros(1, 3, size, size, device=next(model.encoder.parameters()).device)
            return tuple(model.encoder(probe).shape[1:])
        finally:
            model.encoder.train(was)


def encoder_fingerprint(model: Captioner) -> str:
    """SHA-256 over the encoder's weights and buffers (names, dtypes, shapes, bytes) and the
    image size: the grids of one fingerprint are interchangeable, of two never."""
    h = hashlib.sha256(f"image-size={model.config.image_size};encoder={model.config.encoder}".encode())
    for name, tensor in sorted(model.encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def encode_rows(model: Captioner, images, out: np.ndarray, *, device: torch.device | str = "cpu",
                batch_size: int = 64, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Fill `out` (float32 [N, G, D], e.g. a memory-mapped file) with the encoder's grid of each of
    the N uint8 [H, W, 3] rows of `images` (an array or ImageRows), in eval mode; returns `out`."""
    from shared_model.data.datasets import image_tensor

    encoder = model.encoder
    was = encoder.training
    encoder.to(device).eval()
    try:
        for start in range(0, len(images), batch_size):
            rows = np.asarray(images[start: start + batch_size])
            out[start: start + len(rows)] = encoder(image_tensor(rows).to(device)).float().cpu().numpy()
            if progress is not None:
                progress(start + len(rows))
    finally:
        encoder.train(was)
    return out


def in_memory_features(model: Captioner, images, *, device: torch.device | str = "cpu") -> np.ndarray:
    """Every row's grid in memory (a simulated site: small sets, nothing on disk)."""
    out = np.empty((len(images), *grid_shape(model)), dtype=np.float32)
    return encode_rows(model, images, out, device=device)


def rows_digest(keys: Sequence[str]) -> str:
    """SHA-256 over per-row identities (source file digests or record IDs), in row order."""
    h = hashlib.sha256()
    for key in keys:
        h.update(key.encode() + b"\n")
    return h.hexdigest()
