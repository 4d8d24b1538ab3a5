"""The DP-compatible layers compute the same function as their PyTorch counterparts."""

import torch
from torch import nn

from shared_model.model.layers import LSTM, MultiHeadAttention


def test_lstm_equals_torch_lstm():
    ref = nn.LSTM(input_size=6, hidden_size=8, num_layers=2, batch_first=True)
    ours = LSTM(6, 8, num_layers=2)
    with torch.no_grad():
        for k in range(2):
            ours.ih[k].weight.copy_(getattr(ref, f"weight_ih_l{k}"))
            ours.ih[k].bias.copy_(getattr(ref, f"bias_ih_l{k}"))
            ours.hh[k].weight.copy_(getattr(ref, f"weight_hh_l{k}"))
            ours.hh[k].bias.copy_(getattr(ref, f"bias_hh_l{k}"))
    x = torch.randn(3, 7, 6)
    h0, c0 = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out_ref, (h_ref, c_ref) = ref(x, (h0, c0))
    out, (h, c) = ours(x, (h0.transpose(0, 1), c0.transpose(0, 1)))  # ours keeps state batch-first
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(h, h_ref.transpose(0, 1))
    torch.testing.assert_close(c, c_ref.transpose(0, 1))
    # running in two chunks with the carried state gives the same outputs
    out1, state = ours(x[:, :3], (h0.transpose(0, 1), c0.transpose(0, 1)))
    out2, _ = ours(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([out1, out2], 1), out_ref)


def _copy_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    d = ref.embed_dim
    with torch.no_grad():
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(ref.in_proj_weight[i * d:(i + 1) * d])
            proj.bias.copy_(ref.in_proj_bias[i * d:(i + 1) * d])
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


def test_causal_self_attention_equals_torch_mha():
    ref = nn.MultiheadAttention(16, 4, batch_first=True)
    ours = MultiHeadAttention(16, 4)
    _copy_mha(ours, ref)
    x = torch.randn(2, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = masked, torch's convention
    expected, _ = ref(x, x, x, attn_mask=causal, need_weights=False)
    k, v = ours.project_kv(x)
    torch.testing.assert_close(ours(x, k, v, causal_offset=0), expected)
    # incremental: the last 2 queries against a cache of the first 3 positions
    torch.testing.assert_close(ours(x[:, 3:], k, v, causal_offset=3), expected[:, 3:])


def test_cross_attention_equals_torch_mha():
    ref = nn.MultiheadAttention(16, 2, batch_first=True)
    ours = MultiHeadAttention(16, 2)
    _copy_mha(ours, ref)
    x, memory = torch.randn(3, 4, 16), torch.randn(3, 9, 16)
    expected, _ = ref(x, memory, memory, need_weights=False)
    torch.testing.assert_close(ours(x, *ours.project_kv(memory)), expected)
