"""CMI-MTL (Jin et al.): FVTA (QQ-Former + CMCL) → CIFR (Cross-Mamba blocks) → FFAE heads.

Reads next to `../shared/papers/cmi-mtl.md`; DESIGN §3 records each decision the paper leaves
open. The backbones stay outside (medvqa.models.encoders): this module takes their tokens, so it
trains from the feature cache and runs behind Grad-CAM the same way.

    V (B, N, Di), T (B, L, Dt) ─proj→ QQ-Former → z (B, K, d) ──┐
     its queries with T masked out → z_v; CMCL(z_v, T[:, 0]) ───┤  L_vtc (training only)
    z' = LN(z), t' = LN(T) → CrossMambaBlock ×2 → z'', t''      │
    x^f = [tanh(W_t mean t'') ; tanh(W_z mean z'')] → classifier │  L_cls
    [t'' ; z''] ⊙ [M_t ; M_z] → T5 AHead (open questions only)   │  L_aux
    L = L_cls + α L_vtc + β L_aux
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvqa.models.dist import gather_rows
from medvqa.models.encoders import pool_patch_grid
from medvqa.models.mamba import Mamba
from medvqa.models.qformer import QQFormer

ABLATIONS = ("qqformer", "cmcl", "cmm", "ahead")


def align(src, q_this, k_other, other_pad=None, mode: str = "attention"):
    """Bring `src` (B, Lo, E), living on the other stream, to this stream's length Lt.

    attention: parameter-free scaled dot-product attention of this stream's tokens q_this
    (B, Lt, d) over the other stream's k_other (B, Lo, d), padding masked; pool: adaptive average
    pooling / linear interpolation along the sequence, as the public code does.
    """
    Lt = q_this.shape[1]
    if mode == "pool":
        s = src.transpose(1, 2)                                                  # (B, E, Lo)
        s = F.adaptive_avg_pool1d(s, Lt) if s.shape[-1] >= Lt else F.interpolate(s, size=Lt, mode="linear")
        return s.transpose(1, 2)
    att = q_this @ k_other.transpose(1, 2) / q_this.shape[-1] ** 0.5            # (B, Lt, Lo)
    if other_pad is not None:
        att = att.masked_fill(other_pad[:, None, :], float("-inf"))
    return att.softmax(-1) @ src                                                 # (B, Lt, E)


def masked_mean(x, pad):
    """Mean of x (B, L, d) over the positions where pad (B, L) is False -> (B, d)."""
    keep = (~pad).unsqueeze(-1).to(x.dtype)                                      # (B, L, 1)
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


def _smoothed_ce(logits, valid, eps: float = 0.1):
    """Cross-entropy with the diagonal as target and label smoothing (0.1, as the reference code)
    spread over the valid entries only, so masked pairs get neither probability nor target mass."""
    logp = logits.masked_fill(~valid, float("-inf")).log_softmax(-1).masked_fill(~valid, 0.0)
    target = (valid.float() * eps / valid.sum(-1, keepdim=True)
              + (1 - eps) * torch.eye(len(logits), device=logits.device))
    return -(target * logp).sum(-1).mean()


class CrossMambaBlock(nn.Module):
    """z'' = Fus(Mamba(z', z' ⊗ t')) + z',  t'' = Fus(Mamba(t', t' ⊗ z')) + t'  (CMI-MTL Eq. 3).

    Mamba(a, a ⊗ b) runs the SSM branch on a and gates it with SiLU(g_a ⊗ g_b), the product of
    both streams' gate projections; Fus is the output projection. One Mamba's weights serve both
    streams, each with its own scan. A registered, trained module — unlike the public code, which
    re-creates it with random weights on every forward pass.
    """

    def __init__(self, d, d_state=16, d_conv=4, expand=2, align_mode="attention"):
        super().__init__()
        self.norm_z, self.norm_t = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mamba = Mamba(d, d_state=d_state, d_conv=d_conv, expand=expand)
        self.align_mode = align_mode

    def forward(self, z, t, t_pad):
        z1, t1 = self.norm_z(z), self.norm_t(t)                                  # z', t'
        xz, gz = self.mamba.project(z1)                                          # (B, K, E) ×2
        xt, gt = self.mamba.project(t1)                                          # (B, L, E) ×2
        gt_on_z = align(gt, z1, t1, t_pad, self.align_mode)                      # (B, K, E)
        gz_on_t = align(gz, t1, z1, None, self.align_mode)                       # (B, L, E)
        z2 = self.mamba.out_proj(self.mamba.ssm(xz) * F.silu(gz * gt_on_z)) + z1
        t2 = self.mamba.out_proj(self.mamba.ssm(xt) * F.silu(gt * gz_on_t)) + t1
        return z2, t2


class TransformerFusionBlock(nn.Module):
    """The `cmm` ablation: co-attention fusion of the same width (Table 2's Transformer fusion)."""

    def __init__(self, d, n_heads, dropout=0.1):
        super().__init__()
        self.norm_z, self.norm_t, self.norm_ff = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, z, t, t_pad):
        z1, t1 = self.norm_z(z), self.norm_t(t)
        z2 = z1 + self.attn(z1, t1, t1, key_padding_mask=t_pad, need_weights=False)[0]
        t2 = t1 + self.attn(t1, z1, z1, need_weights=False)[0]
        return z2 + self.ffn(self.norm_ff(z2)), t2 + self.ffn(self.norm_ff(t2))


class AHead(nn.Module):
    """Auxiliary head: a T5 encoder-decoder fed x^f (as input embeddings) scaled by the paper's
    learnable mask M (initialised to 1), trained on open questions.

    M = [M_t (max_question_len) ; M_z (K)]: M_t[j] scales question token j and M_z[k] image token k,
    whatever the batch's padded question length, so each weight keeps one meaning.

    It generates over a compact vocabulary: the text backbone's WordPiece ids that occur in the
    training answers (`vocab_ids`; 0 = pad/decoder start, 1 = end, 2 = unknown), which keeps the
    head small enough to ship.
    """

    def __init__(self, cfg, d, vocab_ids: list[int], n_image_tokens: int, max_question_len: int):
        super().__init__()
        from transformers import T5Config, T5ForConditionalGeneration

        self.t5 = T5ForConditionalGeneration(T5Config(
            vocab_size=len(vocab_ids), d_model=cfg.t5_d_model, d_kv=cfg.t5_d_model // cfg.t5_heads,
            d_ff=cfg.t5_ff, num_layers=cfg.t5_layers, num_decoder_layers=cfg.t5_layers, num_heads=cfg.t5_heads,
            dropout_rate=cfg.dropout, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        self.proj = nn.Linear(d, cfg.t5_d_model)
        self.M = nn.Parameter(torch.ones(max_question_len + n_image_tokens))
        self.max_question_len = max_question_len
        self.max_answer_len = cfg.max_answer_len
        self.register_buffer("vocab_ids", torch.tensor(vocab_ids), persistent=False)
        lookup = torch.full((max(vocab_ids) + 1,), 2, dtype=torch.long)
        lookup[torch.tensor(vocab_ids)] = torch.arange(len(vocab_ids))
        self.register_buffer("lookup", lookup, persistent=False)

    def _inputs(self, x_seq, pad):
        # x_seq = [t'' ; z''] (O, L+K, d) with L ≤ max_question_len the batch's padded question length
        L = x_seq.shape[1] - (self.M.shape[0] - self.max_question_len)
        scale = torch.cat([self.M[:L], self.M[self.max_question_len:]])         # (L+K,) = [M_t[:L] ; M_z]
        return self.proj(x_seq) * scale[:, None], (~pad).long()                  # (O, L+K, d_t5), (O, L+K)

    def to_compact(self, full_ids):
        return self.lookup[full_ids.clamp(max=self.lookup.shape[0] - 1)]

    def forward(self, x_seq, pad, answer_ids):
        """answer_ids: (O, A) backbone ids incl. end token, 0-padded -> token cross-entropy."""
        emb, att = self._inputs(x_seq, pad)
        labels = self.to_compact(answer_ids).masked_fill(answer_ids == 0, -100)
        return self.t5(inputs_embeds=emb, attention_mask=att, labels=labels).loss

    @torch.no_grad()
    def generate(self, x_seq, pad):
        """Greedy decoding -> (B, ≤A) backbone token ids (0 after the end)."""
        emb, att = self._inputs(x_seq, pad)
        out = self.t5.generate(inputs_embeds=emb, attention_mask=att, max_new_tokens=self.max_answer_len,
                               do_sample=False, num_beams=1)
        out = out[:, 1:]                                                          # drop decoder start
        ids = self.vocab_ids[out]
        ended = (out == 1).cumsum(1) > 0
        return ids.masked_fill(ended | (out == 0), 0)


class CMIMTL(nn.Module):
    def __init__(self, cfg, enc_cfg, n_classes: int, ahead_vocab: list[int] | None = None):
        super().__init__()
        self.cfg, d = cfg, cfg.d
        ab = set(cfg.ablate)
        self.use_qqformer, self.use_cmcl, self.use_cmm, self.use_ahead = (x not in ab for x in ABLATIONS)
        self.proj_v = nn.Linear(enc_cfg.image_dim, d)
        self.proj_t = nn.Linear(enc_cfg.text_dim, d)
        # w/o QQ-Former the patch grid is average-pooled to ≈K tokens (+CLS): the fusion sees as many
        # image tokens either way, so the ablation measures question-guided selection, not length.
        self.pool_size = round(math.sqrt(cfg.n_queries))
        if self.use_qqformer:
            self.qqformer = QQFormer(d, cfg.n_queries, cfg.qqformer_layers, cfg.n_heads, cfg.dropout, cfg.qqformer_text)
        if self.use_cmcl:  # FVTA contrastive: queries and question in a 256-d space, learnable τ
            self.vision_proj = nn.Linear(d, cfg.contrast_dim)
            self.text_proj = nn.Linear(d, cfg.contrast_dim)
            self.log_tau = nn.Parameter(torch.tensor(0.07).log())
        self.fusion = nn.ModuleList(
            CrossMambaBlock(d, cfg.d_state, cfg.d_conv, cfg.expand, cfg.cmm_align) if self.use_cmm
            else TransformerFusionBlock(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.cmm_blocks))
        self.pool_t, self.pool_z = nn.Linear(d, d), nn.Linear(d, d)   # poolers of x^f (public code)
        w = 2 * d                                                                # width of x^f
        self.classifier = nn.Sequential(nn.Linear(w, w), nn.LayerNorm(w), nn.GELU(),
                                        nn.Dropout(cfg.dropout), nn.Linear(w, n_classes))
        # Prior init (RetinaNet): every sigmoid starts at 1/C, so the summed BCE starts near
        # 1 + log C instead of C·log 2 (≈ 345 for VQA-RAD), which otherwise costs the first epochs.
        nn.init.constant_(self.classifier[-1].bias, -math.log(max(n_classes - 1, 1)))
        if self.use_ahead:
            n_img = cfg.n_queries if self.use_qqformer else 1 + self.pool_size ** 2
            self.ahead = AHead(cfg, d, ahead_vocab or [0, 1, 2], n_img, enc_cfg.max_question_len)
        self.loss_weights = {"cls": 1.0, "vtc": cfg.alpha, "aux": cfg.beta}

    # -- features -------------------------------------------------------------------------------
    def forward_features(self, batch) -> dict:
        v = self.proj_v(batch["image_tokens"])                                   # (B, 1+N, d)
        t = self.proj_t(batch["text_tokens"])                                    # (B, L, d)
        t_pad = batch["text_mask"] == 0                                          # (B, L)
        # CMCL contrasts queries that never saw the question (BLIP-2's unimodal mask for ITC): contrasting the
        # question-aware queries with that same question is solved by copying the question into z, which
        # aligns nothing. The question-aware z feeds the fusion; z_fvta is a training-only by-product.
        cmcl = self.use_cmcl and self.training
        if not self.use_qqformer:
            z = z_fvta = pool_patch_grid(v, self.pool_size)                      # (B, 1+pool², d)
        elif cmcl:
            z, z_fvta = self.qqformer(v, t, t_pad, unimodal=True)                # (B, K, d) ×2
        else:
            z, z_fvta = self.qqformer(v, t, t_pad), None                         # (B, K, d)
        t_fvta = t[:, 0]                                                         # (B, d)
        for block in self.fusion:
            z, t = block(z, t, t_pad)
        # not the public code's first-token poolers: a causal scan leaves position 0 blind to the rest
        # of its stream, so x^f averages all positions
        t_vec, z_vec = masked_mean(t, t_pad), z.mean(1)
        t_vec, z_vec = torch.tanh(self.pool_t(t_vec)), torch.tanh(self.pool_z(z_vec))   # (B, d) each
        x_vec = torch.cat([t_vec, z_vec], -1)                                    # (B, 2d)
        x_seq = torch.cat([t, z], 1)                                             # (B, L+K, d)
        seq_pad = torch.cat([t_pad, torch.zeros_like(z[..., 0], dtype=torch.bool)], 1)
        return {"fused": x_vec, "x_seq": x_seq, "seq_pad": seq_pad, "z_fvta": z_fvta, "t_fvta": t_fvta}

    def forward_head(self, fused):
        return self.classifier(fused)                                            # (B, C)

    @property
    def has_query_attention(self) -> bool:
        """Whether `image_attention` has a question-aware reading of the image to show (the
        `query-attention` saliency): the QQ-Former's; the w/o-QQ-Former ablation has none."""
        return self.use_qqformer

    def image_attention(self, batch):
        """The QQ-Former's question-conditioned attention over the image tokens -> (B, 1+N)
        (the `query-attention` saliency; only where `has_query_attention`: the w/o-QQ-Former ablation has none)."""
        v, t = self.proj_v(batch["image_tokens"]), self.proj_t(batch["text_tokens"])
        return self.qqformer.image_attention(v, t, batch["text_mask"] == 0)

    # -- losses ---------------------------------------------------------------------------------
    def cmcl_logits(self, z, t_first):
        """s(i, j) = max_k cos(z_ik, t_j) / τ in the 256-d contrast space: z (B, K, d), t_first (B, d) -> (B, B)."""
        zq = F.normalize(self.vision_proj(z), dim=-1)                            # (B, K, c)
        tq = F.normalize(self.text_proj(t_first), dim=-1)                        # (B, c)
        tau = self.log_tau.exp().clamp(0.01, 0.5)
        return torch.einsum("ikc,jc->ijk", zq, tq).amax(-1) / tau

    def cmcl_loss(self, z, t_first, image_ids, text_ids):
        """Symmetric InfoNCE over cmcl_logits. Pairs that are not true negatives are masked out, which the
        public code does not do: other questions on the same image, and the same question text on another
        image (SLAKE's templated questions: ~29 % of rows in a batch of 32 share their text with another
        image's row, which no image can tell apart). Under torchrun the negatives come from every rank's batch."""
        z, t_first, image_ids, text_ids = gather_rows(z, t_first, image_ids, text_ids)   # B → global batch
        sim = self.cmcl_logits(z, t_first)                                       # (B, B)
        eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
        same = (image_ids[:, None] == image_ids[None, :]) | (text_ids[:, None] == text_ids[None, :])
        valid = ~(same & ~eye)                                                   # (B, B), symmetric
        return 0.5 * (_smoothed_ce(sim, valid) + _smoothed_ce(sim.t(), valid))

    def forward(self, batch) -> dict:
        f = self.forward_features(batch)
        logits = self.forward_head(f["fused"])
        out = {"logits": logits, "fused": f["fused"], "losses": {}}
        if "label" not in batch:
            return out
        y = batch["label"]
        # BCE over the answer vocabulary, summed over classes (the reference's BCE × C)
        known = y >= 0
        onehot = F.one_hot(y.clamp(min=0), logits.shape[-1]).float()
        bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none").sum(-1)
        out["losses"]["cls"] = (bce * known).sum() / known.sum().clamp(min=1)
        if self.use_cmcl and self.training and len(y) > 1:
            out["losses"]["vtc"] = self.cmcl_loss(f["z_fvta"], f["t_fvta"], batch["image_id"], batch["text_id"])
        if self.use_ahead and self.training:
            o = batch["is_open"]
            out["losses"]["aux"] = (self.ahead(f["x_seq"][o], f["seq_pad"][o], batch["answer_ids"][o]) if o.any()
                                    else logits.sum() * 0.0)   # no open question in the batch: L_aux = 0
        return out

    @torch.no_grad()
    def generate(self, batch):
        """The AHead's free-form answer ids (beyond the paper; shown labelled as such)."""
        f = self.forward_features(batch)
        return self.ahead.generate(f["x_seq"], f["seq_pad"])
