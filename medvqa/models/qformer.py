"""QQ-Former: question-aware querying transformer (CMI-MTL §2.2, after BLIP-2's Q-Former).

Each layer: self-attention over [queries ; question tokens] — BLIP-2's shared self-attention,
which is what makes the K queries question-aware — then cross-attention from the queries to the
image tokens, then an FFN. Pre-norm residual blocks. With `use_text=False` the queries attend
only to themselves (the public code's image-only reading).

`unimodal=True` also returns the queries of the same layers with the question masked out
(BLIP-2's unimodal self-attention mask, which CMCL needs), from the same pass: a second set of K
queries rides along behind a block mask, so the image tokens' keys and values are computed once.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class QQFormerLayer(nn.Module):
    def __init__(self, d: int, n_heads: int, dropout: float = 0.1, ffn_mult: int = 4):
        super().__init__()
        self.norm_sa, self.norm_ca, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, q, t, t_pad, v, need_weights: bool = False, q_v=None):
        # q: (B, K, d) queries; t: (B, L, d) question, t_pad: (B, L) True = padding, or t=None; v: (B, N, d);
        # q_v: (B, K, d) image-only queries or None -> q, t, q_v and, with need_weights, the cross-attention
        # of q (B, K, N) averaged over heads (else None)
        K = q.shape[1]
        x = q if t is None else torch.cat([q, t], 1)                                   # (B, K+L, d)
        pad = None if t is None else torch.cat([torch.zeros_like(t_pad[:, :1]).expand(-1, K), t_pad], 1)
        n, block = x.shape[1], None
        if q_v is not None:  # [q ; t] and q_v do not see each other: block[i, j] True = i may not attend to j
            x = torch.cat([x, q_v], 1)                                                 # (B, K+L+K, d)
            pad = None if pad is None else torch.cat([pad, torch.zeros_like(pad[:, :K])], 1)
            side = torch.arange(n + K, device=x.device) >= n
            block = side[:, None] != side[None, :]                                     # (K+L+K, K+L+K)
        h = self.norm_sa(x)
        x = x + self.drop(self.self_attn(h, h, h, key_padding_mask=pad, attn_mask=block, need_weights=False)[0])
        t = None if t is None else x[:, K:n]
        q = x[:, :K] if q_v is None else torch.cat([x[:, :K], x[:, n:]], 1)           # (B, K or 2K, d)
        h = self.norm_ca(q)
        ca, w = self.cross_attn(h, v, v, need_weights=need_weights)
        q = q + self.drop(ca)
        q = q + self.drop(self.ffn(self.norm_ff(q)))
        return q[:, :K], t, (None if q_v is None else q[:, K:]), (None if w is None else w[:, :K])


class QQFormer(nn.Module):
    def __init__(self, d: int, n_queries: int, n_layers: int, n_heads: int, dropout: float = 0.1,
                 use_text: bool = True):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, n_queries, d) * 0.02)
        self.layers = nn.ModuleList(QQFormerLayer(d, n_heads, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d)
        self.use_text = use_text

    def forward(self, v, t, t_pad, unimodal: bool = False):
        """v: (B, N, d) image tokens, t: (B, L, d) question tokens (None: the image-only reading)
        -> z (B, K, d); with unimodal, (z, z_v): z_v (B, K, d) the queries that never saw the question."""
        z, z_v, _ = self._run(v, t, t_pad, unimodal=unimodal)
        return (z, z_v) if unimodal else z

    def image_attention(self, v, t, t_pad):
        """Where the question-aware queries read the image: cross-attention averaged over heads,
        layers and queries -> (B, N), each row summing to 1."""
        return torch.stack(self._run(v, t, t_pad, need_weights=True)[2]).mean((0, 2))

    def _run(self, v, t, t_pad, need_weights: bool = False, unimodal: bool = False):
        q = self.queries.expand(v.shape[0], -1, -1)
        t = t if self.use_text else None
        q_v = q if unimodal and t is not None else None       # without the question both readings are one
        weights = []
        for layer in self.layers:
            q, t, q_v, w = layer(q, t, t_pad, v, need_weights, q_v)
            weights.append(w)
        z = self.norm(q)
        return z, (None if not unimodal else z if q_v is None else self.norm(q_v)), weights
