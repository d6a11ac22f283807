"""The floor every paper model must beat: frozen backbone tokens, question-conditioned attention
pooling over the image tokens, and an MLP classifier (softmax cross-entropy)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Baseline(nn.Module):
    has_query_attention = True   # its pooling weights are a question-conditioned attention over the image

    def __init__(self, cfg, enc_cfg, n_classes: int):
        super().__init__()
        d = cfg.d
        self.proj_v = nn.Linear(enc_cfg.image_dim, d)
        self.proj_t = nn.Linear(enc_cfg.text_dim, d)
        self.mlp = nn.Sequential(nn.LayerNorm(3 * d), nn.Dropout(cfg.dropout), nn.Linear(3 * d, cfg.hidden),
                                 nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, n_classes))
        self.loss_weights = {"cls": 1.0}

    def _attend(self, batch):
        v = self.proj_v(batch["image_tokens"])                                   # (B, 1+N, d)
        q = self.proj_t(batch["text_pooled"])                                    # (B, d)
        att = torch.softmax(v @ q.unsqueeze(-1) / v.shape[-1] ** 0.5, dim=1)     # (B, 1+N, 1)
        return v, q, att

    def image_attention(self, batch):
        """The question-conditioned pooling weights over the image tokens -> (B, 1+N) (the
        `query-attention` saliency)."""
        return self._attend(batch)[2][..., 0]

    def forward_features(self, batch) -> dict:
        v, q, att = self._attend(batch)
        pooled = (att * v).sum(1)                                                # (B, d)
        return {"fused": torch.cat([pooled, q, pooled * q], -1)}                 # (B, 3d)

    def forward_head(self, fused):
        return self.mlp(fused)

    def forward(self, batch) -> dict:
        f = self.forward_features(batch)
        logits = self.forward_head(f["fused"])
        out = {"logits": logits, "fused": f["fused"], "losses": {}}
        if "label" in batch:
            out["losses"]["cls"] = F.cross_entropy(logits, batch["label"], ignore_index=-1)
        return out
