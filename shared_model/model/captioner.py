"""The captioner: image encoder -> fusion -> decoder, built from one `CaptionerConfig`.

One decoder function, `step`, serves teacher forcing (a whole caption as one chunk), greedy
decoding and beam search (one token per call). Decoder state is a dict of batch-first tensors, so
beam search reorders it without knowing the decoder.

Fusion of image and text:
  concat     the pooled image feature is joined to every word embedding, then projected
  add        the projected pooled image feature is added to every word embedding
  attention  the decoder attends over the encoder's spatial grid at every step
               (transformer: cross-attention in each block; LSTM: attention with the previous
               hidden state as query, its context joined to the word embedding)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CaptionerConfig
from .encoders import build_encoder
from .layers import LSTM, MultiHeadAttention, TransformerDecoderLayer, sinusoidal_positions
from shared_model.data.vocab import Vocabulary

State = dict[str, Tensor]


def caption_loss(logits: Tensor, targets: Tensor, *, pad_id: int = Vocabulary.pad_id, reduction: str = "mean") -> Tensor:
    """Per-caption cross-entropy: mean over each caption's own non-pad tokens, then (reduction
    "mean") the mean over the batch, or (reduction "none") one value per caption.

    This is what DP-SGD needs: each example's gradient is the gradient of its own loss, whatever the
    other captions' lengths, so Opacus's clipping bound holds. An empty batch gives a zero loss.
    """
    # logits: [B, T, V]; targets: [B, T]
    mask = (targets != pad_id).to(logits.dtype)
    token_ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T]
    per_caption = (token_ce * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B]
    if reduction == "none":
        return per_caption
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_caption.sum() / max(per_caption.shape[0], 1)


class CaptionLoss:
    """`caption_loss` as a criterion object (logits, targets) -> loss with a settable `reduction`
    ("mean" or "none"), the interface Opacus's ghost-clipping loss wrapper drives: it switches
    `reduction` to "none" to get one loss per caption, then does its two backward passes."""

    def __init__(self, *, pad_id: int = Vocabulary.pad_id, reduction: str = "mean") -> None:
        self.pad_id, self.reduction = pad_id, reduction

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        return caption_loss(logits, targets, pad_id=self.pad_id, reduction=self.reduction)


class Captioner(nn.Module):
    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        if not isinstance(config, CaptionerConfig):
            raise TypeError(f"config must be a CaptionerConfig, got {type(config).__name__}")
        self.config = c = config
        self.encoder = build_encoder(c)
        self.embed = nn.Embedding(c.vocab_size, c.d_model, padding_idx=Vocabulary.pad_id)
        self.drop = nn.Dropout(c.dropout)
        if c.fusion == "concat":
            self.fuse = nn.Linear(2 * c.d_model, c.d_model)
        elif c.fusion == "add":
            self.fuse = nn.Linear(c.d_model, c.d_model)
        if c.decoder == "transformer":
            self.register_buffer("positions", sinusoidal_positions(c.max_len, c.d_model), persistent=False)
            self.layers = nn.ModuleList(
                TransformerDecoderLayer(c.d_model, c.num_heads, c.ffn_dim, c.dropout, c.fusion == "attention")
                for _ in range(c.num_layers)
            )
            self.ln_f = nn.LayerNorm(c.d_model)
        else:
            if c.fusion == "attention":
                self.attn = MultiHeadAttention(c.d_model, c.num_heads)
            lstm_in = 2 * c.d_model if c.fusion == "attention" else c.d_model
            self.lstm = LSTM(lstm_in, c.d_model, c.num_layers)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size)

    # ---- encoder side -------------------------------------------------------------------------
    def start(self, images: Tensor) -> State:
        """Encode images [B, 3, H, W] in [0, 1] into the initial decoder state."""
        return self.start_from_grid(self.encoder(images))

    def start_from_grid(self, grid: Tensor) -> State:
        """The initial decoder state from the encoder's output grid [B, G, D] (model/features.py
        trains from grids computed once when the encoder does not train)."""
        state: State = {}
        c = self.config
        if c.fusion == "attention":
            if c.decoder == "transformer":
                for i, layer in enumerate(self.layers):
                    state[f"mem_k{i}"], state[f"mem_v{i}"] = layer.cross_attn.project_kv(grid)
            else:
                state["mem_k"], state["mem_v"] = self.attn.project_kv(grid)
                state["h"] = grid.new_zeros(grid.shape[0], c.num_layers, c.d_model)
                state["c"] = state["h"]
        else:
            state["image"] = grid.mean(dim=1)  # [B, D]
        return state

    def _fuse(self, emb: Tensor, state: State) -> Tensor:
        # emb: [B, T, D] word embeddings -> decoder inputs [B, T, D]
        if self.config.fusion == "attention":
            return emb
        image = state["image"][:, None, :].expand_as(emb)
        if self.config.fusion == "concat":
            return self.fuse(torch.cat([emb, image], dim=-1))
        return emb + self.fuse(image)

    # ---- the one decoder step -----------------------------------------------------------------
    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Decode a chunk of tokens [B, T] after what `state` has seen; logits [B, T, V]."""
        x = self.drop(self._fuse(self.embed(tokens), state))  # [B, T, D]
        new = dict(state)
        if self.config.decoder == "transformer":
            past = state["k0"].shape[2] if "k0" in state else 0
            if past + tokens.shape[1] > self.config.max_len:
                raise ValueError(f"caption longer than max_len {self.config.max_len}")
            x = x + self.positions[past: past + tokens.shape[1]]
            for i, layer in enumerate(self.layers):
                cache = (state[f"k{i}"], state[f"v{i}"]) if past else None
                memory = (state[f"mem_k{i}"], state[f"mem_v{i}"]) if layer.cross_attn is not None else None
                x, (new[f"k{i}"], new[f"v{i}"]) = layer(x, cache, memory)
            x = self.ln_f(x)
        elif self.config.fusion == "attention":
            outputs = []
            h, c = state["h"], state["c"]
            for t in range(x.shape[1]):  # the query of step t is the top layer's previous hidden state
                context = self.attn(h[:, -1:, :], state["mem_k"], state["mem_v"])  # [B, 1, D]
                out, (h, c) = self.lstm(torch.cat([x[:, t: t + 1], context], dim=-1), (h, c))
                outputs.append(out)
            x, new["h"], new["c"] = torch.cat(outputs, dim=1), h, c
        else:
            prev = (state["h"], state["c"]) if "h" in state else None
            x, (new["h"], new["c"]) = self.lstm(x, prev)
        return self.lm_head(self.drop(x)), new

    @staticmethod
    def reorder_state(state: State, index: Tensor) -> State:
        """Select batch rows of every state tensor (beam search)."""
        return {k: v.index_select(0, index) for k, v in state.items()}

    # ---- training -----------------------------------------------------------------------------
    def forward(self, images: Tensor, captions: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing. captions: [B, T] = <start> w1 .. wn <end> <pad>..; returns
        (logits [B, T-1, V], per-caption mean loss averaged over the batch)."""
        # contiguous: Opacus's ghost-clipping norm sampler for the embedding calls .view on its input
        logits, _ = self.step(captions[:, :-1].contiguous(), self.start(images))
        return logits, caption_loss(logits, captions[:, 1:])

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images: Tensor, *, beam_size: int = 1, max_len: int | None = None) -> Tensor:
        """Token ids [B, L] after <start>, each row ending in <end> then <pad> (or cut at max_len)."""
        from .decoding import beam_search, greedy_decode

        max_len = self.config.max_len if max_len is None else max_len
        if not 2 <= max_len <= self.config.max_len:
            raise ValueError(f"max_len must be in [2, {self.config.max_len}], got {max_len}")
        if beam_size == 1:
            return greedy_decode(self, images, max_len=max_len)
        return beam_search(self, images, beam_size=beam_size, max_len=max_len)

    def caption(self, images: Tensor, vocab: Vocabulary, *, beam_size: int = 1) -> list[str]:
        was_training = self.training
        self.eval()
        try:
            return [vocab.decode(row) for row in self.generate(images, beam_size=beam_size).tolist()]
        finally:
            self.train(was_training)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain model inside a wrapper such as Opacus's GradSampleModule (whose state_dict keys carry
    `_module.`)."""
    return getattr(module, "_module", module)
