"""DP-compatible building blocks: every trainable leaf is nn.Linear, nn.Embedding or nn.LayerNorm.

Opacus computes per-sample gradients for those leaves in hooks, ghost-clipping and functorch
modes. nn.LSTM and nn.MultiheadAttention are refused by Opacus, and its DPMultiheadAttention with
batch_first=True computes a different function (opacus#774), so the recurrent and attention layers
are written here from nn.Linear and `F.scaled_dot_product_attention`; tests prove each one equal to
its plain PyTorch counterpart with copied weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LSTM(nn.Module):
    """Stacked, batch-first LSTM; the same function as `nn.LSTM(batch_first=True)`.

    Per layer, the input projection runs once over the whole chunk; the recurrent projection
    runs once per time step (so this layer is usable in Opacus hooks mode, not ghost mode).
    Gate order i, f, g, o as in PyTorch.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1) -> None:
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.ih = nn.ModuleList(
            nn.Linear(input_size if i == 0 else hidden_size, 4 * hidden_size) for i in range(num_layers)
        )
        self.hh = nn.ModuleList(nn.Linear(hidden_size, 4 * hidden_size) for _ in range(num_layers))

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x: [B, T, I]; state: (h, c) each [B, L, H]  (batch-first so beam search can reorder it)
        B, T, _ = x.shape
        if state is None:
            zeros = x.new_zeros(B, self.num_layers, self.hidden_size)
            state = (zeros, zeros)
        h_all, c_all = state
        h_out, c_out = [], []
        for layer in range(self.num_layers):
            h, c = h_all[:, layer], c_all[:, layer]  # [B, H]
            gates_x = self.ih[layer](x)  # [B, T, 4H]
            outputs = []
            for t in range(T):
                gates = gates_x[:, t] + self.hh[layer](h)
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)  # [B, T, H]
            h_out.append(h)
            c_out.append(c)
        return x, (torch.stack(h_out, dim=1), torch.stack(c_out, dim=1))


class MultiHeadAttention(nn.Module):
    """Multi-head attention from nn.Linear + SDPA; the same function as
    `nn.MultiheadAttention(batch_first=True)` with separate q/k/v projections.

    Keys and values are projected by `project_kv`, so callers can cache them (decoder
    self-attention cache, encoder memory).
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: Tensor) -> Tensor:
        B, T, D = x.shape  # -> [B, heads, T, D/heads]
        return x.view(B, T, self.num_heads, D // self.num_heads).transpose(1, 2)

    def project_kv(self, source: Tensor) -> tuple[Tensor, Tensor]:
        # source: [B, S, D] -> k, v: [B, heads, S, D/heads]
        return self._heads(self.k_proj(source)), self._heads(self.v_proj(source))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, *, causal_offset: int | None = None) -> Tensor:
        """x: [B, T, D] queries; k, v from `project_kv`. With `causal_offset` p, query i (absolute
        position p + i) sees keys 0..p + i; None means every key is visible."""
        q = self._heads(self.q_proj(x))  # [B, h, T, d]
        T, S = q.shape[2], k.shape[2]
        mask, is_causal = None, False
        if causal_offset is not None and T > 1:
            if causal_offset == 0 and S == T:
                is_causal = True
            else:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=causal_offset)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        B, _, _, d = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * d))


class TransformerDecoderLayer(nn.Module):
    """Pre-norm decoder block: causal self-attention, optional cross-attention, MLP."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, cross_attention: bool) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ln_cross = nn.LayerNorm(d_model) if cross_attention else None
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout) if cross_attention else None
        self.ln_mlp = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, cache: tuple[Tensor, Tensor] | None, memory_kv: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # x: [B, T, D]; cache: self-attention (k, v) of earlier positions; returns the extended cache
        h = self.ln_self(x)
        k, v = self.self_attn.project_kv(h)
        past = 0
        if cache is not None:
            past = cache[0].shape[2]
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        x = x + self.drop(self.self_attn(h, k, v, causal_offset=past))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.ln_cross(x), *memory_kv))
        x = x + self.drop(self.fc2(F.gelu(self.fc1(self.ln_mlp(x)))))
        return x, (k, v)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """[length, dim] fixed sinusoidal encodings (no parameters, so nothing to privatize)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe


def sinusoidal_positions_2d(height: int, width: int, dim: int) -> Tensor:
    """[height * width, dim]: half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"2-D positional encoding needs dim divisible by 4, got {dim}")
    rows = sinusoidal_positions(height, dim // 2)[:, None, :].expand(height, width, dim // 2)
    cols = sinusoidal_positions(width, dim // 2)[None, :, :].expand(height, width, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(height * width, dim)
