"""Greedy decoding and beam search over `Captioner.start` / `step` / `reorder_state`."""

from __future__ import annotations

import torch
from torch import Tensor

from shared_model.data.vocab import Vocabulary

PAD, START, END = Vocabulary.pad_id, Vocabulary.start_id, Vocabulary.end_id


def greedy_decode(model, images: Tensor, *, max_len: int) -> Tensor:
    """Argmax at every step; finished rows continue with <pad>. Returns [B, <= max_len - 1]."""
    state = model.start(images)
    B = images.shape[0]
    last = torch.full((B, 1), START, dtype=torch.long, device=images.device)
    finished = torch.zeros(B, dtype=torch.bool, device=images.device)
    out = []
    for _ in range(max_len - 1):
        logits, state = model.step(last, state)
        nxt = logits[:, -1].argmax(dim=-1).masked_fill(finished, PAD)
        out.append(nxt)
        finished |= nxt == END
        last = nxt[:, None]
        if finished.all():
            break
    return torch.stack(out, dim=1)


def beam_search(model, images: Tensor, *, beam_size: int, max_len: int, length_penalty: float = 0.0) -> Tensor:
    """Keeps `beam_size` hypotheses per image by summed log-probability; a finished hypothesis
    only extends with <pad> at no cost. The best is chosen by score / length**length_penalty
    (0 = plain log-probability, which makes beam_size 1 identical to greedy)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    B, K, device = images.shape[0], beam_size, images.device
    state = model.reorder_state(model.start(images), torch.arange(B, device=device).repeat_interleave(K))
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive
    tokens = torch.empty(B * K, 0, dtype=torch.long, device=device)
    last = torch.full((B * K, 1), START, dtype=torch.long, device=device)
    finished = torch.zeros(B * K, dtype=torch.bool, device=device)
    lengths = torch.zeros(B * K, device=device)
    for _ in range(max_len - 1):
        logits, state = model.step(last, state)
        logp = logits[:, -1].float().log_softmax(dim=-1)  # [B*K, V]
        V = logp.shape[-1]
        logp[finished] = float("-inf")
        logp[finished, PAD] = 0.0
        top, idx = (scores.view(-1, 1) + logp).view(B, K * V).topk(K, dim=-1)  # [B, K]
        rows = (torch.arange(B, device=device)[:, None] * K + idx // V).view(-1)
        word = (idx % V).view(-1)
        tokens = torch.cat([tokens[rows], word[:, None]], dim=1)
        lengths = lengths[rows] + (~finished[rows]).float()
        finished = finished[rows] | (word == END)
        state = model.reorder_state(state, rows)
        scores, last = top, word[:, None]
        if finished.all():
            break
    ranked = scores / lengths.view(B, K).clamp(min=1.0) ** length_penalty if length_penalty else scores
    best = ranked.argmax(dim=-1) + torch.arange(B, device=device) * K
    return tokens[best]
