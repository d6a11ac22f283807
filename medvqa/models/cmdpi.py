"""CMDPI (Cross-Modality Discriminative Pattern Identification): co-regularised pretraining,
difference reconstruction and head mixup, reading next to `../shared/papers/cmdpi.md`.

DESIGN §4 records the decisions the paper leaves open; the ones taken here are in
docs/decisions.md. The frozen backbones stay outside (medvqa.models.encoders): the image and text
"encoders" of the paper are here the backbone tokens plus a trainable adapter (projection + one
Transformer layer), so masking, momentum copies and contrast act on what is trained.

    h_I, H_I = ImageEncoder(Input_I)   h_T, H_T = TextEncoder(Input_T)   h_F = GlobalFusion(h_I, h_T)
    H_o = RecNet([h ; H_I ; H_T ; a] + pos)          h = h_F (global) or h̃ (local), a = answer slot
    Output_I = FFN_I(H_o[:, 1:N+1])   Output_T = FFN_T(H_o[:, N+1:N+M+1])   Ans' = FFN_A(H_o[:, -1])

    pretrain:  L = L_rec(global) + L_rec(local) + α C_inter + α' C_intra     (Eqs. 2–7)
    finetune:  L_ft = L_mix + L_diff                                        (Eqs. 8–13)
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvqa.models.dist import gather_rows
from medvqa.models.encoders import pool_patch_grid

ABLATIONS = ("global", "local", "inter", "intra", "diff", "mixup")
STAGE_ABLATIONS = {"pretrain": ABLATIONS[:4], "finetune": ABLATIONS[4:]}   # each stage's own terms


def patchify(pixels, p: int):
    """(B, 3, S, S) -> (B, (S/p)², p·p·3), row-major patches as the token grid."""
    B, C, S, _ = pixels.shape
    g = S // p
    x = pixels.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)             # (B, g, g, p, p, C)
    return x.reshape(B, g * g, p * p * C)


def normalized_patches(pixels, p: int):
    """MAE's normalised-pixel targets: each patch to zero mean, unit variance."""
    x = patchify(pixels.float() / 255.0, p)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()


def random_mask(valid, ratio: float, generator=None):
    """(B, L) bool of positions to mask: round(ratio · n_valid) per row (at least one) chosen
    uniformly among the valid positions."""
    score = torch.rand(valid.shape, device=valid.device, generator=generator).masked_fill(~valid, 2.0)
    rank = score.argsort(1).argsort(1)                                           # (B, L) rank of each position
    n = (valid.sum(1, keepdim=True) * ratio).round().clamp(min=1)
    return (rank < n) & valid


def contra(a, b, tau, text_ids=None):
    """Eq. 7: InfoNCE of a's rows against b's rows, the diagonal as positives. With text_ids (N,),
    rows of identical text are not each other's negatives (masked out): most pseudo-captions are
    the same few strings ("image of the chest"), whose pairs would otherwise be false negatives."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / tau          # (N, N)
    if text_ids is not None:
        same = (text_ids[:, None] == text_ids[None, :]) & ~torch.eye(len(a), dtype=torch.bool, device=a.device)
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


class ModalityEncoder(nn.Module):
    """Backbone tokens -> (global h, local H): projection, [MASK] at masked positions, a
    pre-norm Transformer layer, LayerNorm. Position 0 (CLS) is the global feature."""

    def __init__(self, d_in, d, n_layers, n_heads, dropout):
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(d, n_heads, 4 * d, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens, mask=None, pad=None):
        # tokens: (B, 1+N, d_in); mask: (B, 1+N) True = replace by [MASK]; pad: (B, 1+N) True = padding
        x = self.proj(tokens)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = self.norm(self.layers(x, src_key_padding_mask=pad))
        return x[:, 0], x[:, 1:]                                                 # (B, d), (B, N, d)


class RecNet(nn.Module):
    """Eq. 3: v_0 = [h ; H_I ; H_T ; a] + pos, then post-norm layers LN(MHA(v) + v), LN(FFN(v̂) + v̂)."""

    def __init__(self, d, n_layers, n_heads, d_ff, max_len, dropout):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(max_len, d))
        nn.init.normal_(self.pos, std=0.02)
        self.answer_slot = nn.Parameter(torch.zeros(d))
        layer = nn.TransformerEncoderLayer(d, n_heads, d_ff, dropout, activation="gelu", batch_first=True,
                                           norm_first=False)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)

    def forward(self, h, H_I, H_T, t_pad):
        # h: (B, d); H_I: (B, N, d); H_T: (B, M, d); t_pad: (B, M) True = padding (right) -> H_o (B, 1+N+M+1, d)
        B, N, M = h.shape[0], H_I.shape[1], H_T.shape[1]
        v = torch.cat([h[:, None], H_I, H_T], 1) + self.pos[:1 + N + M]
        # The answer slot follows the question's own tokens (Eq. 3): its position is 1+N+len, not 1+N+M, so the
        # answer does not depend on how long the other questions of the batch are.
        a = self.answer_slot + self.pos[1 + N + (~t_pad).sum(1)]                  # (B, d)
        v = torch.cat([v, a[:, None]], 1)
        no = torch.zeros(B, 1 + N, dtype=torch.bool, device=h.device)
        pad = torch.cat([no, t_pad, no[:, :1]], 1)
        return self.layers(v, src_key_padding_mask=pad)


class CMDPI(nn.Module):
    has_query_attention = False   # RecNet mixes image and question tokens in one self-attention: no such map

    def __init__(self, cfg, enc_cfg, n_classes: int, grid: int, text_vocab: list[int] | None = None):
        super().__init__()
        self.cfg, d = cfg, cfg.d
        self.use = {k: k not in cfg.ablate for k in ABLATIONS}
        self.pool, self.grid = cfg.image_pool, grid
        self.n_img = (grid // cfg.image_pool) ** 2                               # N
        self.image_encoder = ModalityEncoder(enc_cfg.image_dim, d, cfg.adapter_layers, cfg.rec_heads, cfg.dropout)
        self.text_encoder = ModalityEncoder(enc_cfg.text_dim, d, cfg.adapter_layers, cfg.rec_heads, cfg.dropout)
        self.global_fusion = nn.Sequential(nn.Linear(2 * d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.LayerNorm(d))
        self.h_tilde = nn.Parameter(torch.zeros(d))                              # shared vector of local reconstruction
        nn.init.normal_(self.h_tilde, std=0.02)
        self.recnet = RecNet(d, cfg.rec_layers, cfg.rec_heads, cfg.rec_ff,
                             1 + self.n_img + enc_cfg.max_question_len + 1, cfg.dropout)
        # Text targets live in a compact vocabulary (the backbone ids seen in training text; 0 = other),
        # which keeps FFN_T small enough to ship.
        text_vocab = text_vocab or [0]
        self.register_buffer("text_vocab", torch.tensor(text_vocab), persistent=False)
        lookup = torch.zeros(max(text_vocab) + 1, dtype=torch.long)
        lookup[torch.tensor(text_vocab)] = torch.arange(len(text_vocab))
        self.register_buffer("text_lookup", lookup, persistent=False)
        self.ffn_i = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.pixel_patch ** 2 * 3))
        self.ffn_t = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, len(text_vocab)))
        self.ffn_a = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.LayerNorm(2 * d), nn.Dropout(cfg.head_dropout),
                                   nn.Linear(2 * d, n_classes))
        self.log_tau = nn.Parameter(torch.tensor(cfg.tau).log())
        if cfg.stage == "pretrain" and self.use["intra"]:
            # Momentum encoders (MoCo): EMA copies that take no gradient; only pretraining has them.
            self.momentum_image = copy.deepcopy(self.image_encoder).requires_grad_(False)
            self.momentum_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        if cfg.stage == "pretrain":
            self.loss_weights = {"inter": cfg.alpha, "intra": cfg.alpha_intra}
        else:
            self.loss_weights = {"mix": cfg.mix_weight, "ans": cfg.mix_weight,
                                 "diff_img": cfg.diff_weight, "diff_txt": cfg.diff_weight}

    # -- encoders -------------------------------------------------------------------------------
    def _image_tokens(self, image_tokens):
        """(B, 1+g², Di) backbone tokens -> (B, 1+N, Di), the grid average-pooled by `image_pool`."""
        return pool_patch_grid(image_tokens, self.grid // self.pool)

    def encode_image(self, image_tokens, mask=None):
        """(B, 1+g², Di) -> h_I (B, d), H_I (B, N, d); mask (B, N) True = masked patch (Eq. 2)."""
        return self.image_encoder(self._image_tokens(image_tokens), None if mask is None else F.pad(mask, (1, 0)))

    def encode_text(self, batch, mask=None):
        """-> h_T (B, d), H_T (B, M, d) with M = L-1 tokens after [CLS]; mask (B, M) True = masked."""
        return self.text_encoder(batch["text_tokens"], None if mask is None else F.pad(mask, (1, 0)),
                                 batch["text_mask"] == 0)

    def global_features(self, image_tokens):
        """Pretrained global image features h_I, for the similar-image table of difference reconstruction."""
        return self.encode_image(image_tokens)[0]

    def reconstruct(self, h, H_I, H_T, t_pad):
        """RecNet + heads -> (Output_I (B, N, p²·3), Output_T logits (B, M, V), Ans' logits, h_D)."""
        H_o = self.recnet(h, H_I, H_T, t_pad)
        N, M = H_I.shape[1], H_T.shape[1]
        h_D = H_o[:, -1]
        return self.ffn_i(H_o[:, 1:N + 1]), self.ffn_t(H_o[:, N + 1:N + 1 + M]), self.ffn_a(h_D), h_D

    # -- losses ---------------------------------------------------------------------------------
    def _rec_losses(self, out_i, out_t, batch, img_sel, txt_sel):
        """MSE on the selected patches' normalised pixels, CE on the selected text tokens."""
        target_i = normalized_patches(batch["pixels"], self.cfg.pixel_patch)   # (B, N, p²·3)
        mse = ((out_i.float() - target_i) ** 2).mean(-1)                         # (B, N)
        l_img = (mse * img_sel).sum() / img_sel.sum().clamp(min=1)
        ids = batch["input_ids"][:, 1:]
        n = len(self.text_lookup)
        ids = torch.where(ids < n, self.text_lookup[ids.clamp(max=n - 1)], 0)   # (B, M) compact ids, 0 = other
        l_txt = F.cross_entropy(out_t[txt_sel].float(), ids[txt_sel]) if txt_sel.any() else out_t.sum() * 0.0
        return l_img, l_txt

    def _text_positions(self, batch):
        """(B, M) real question tokens after [CLS], excluding the final [SEP]."""
        m = batch["text_mask"][:, 1:].bool()
        last = m.sum(1, keepdim=True) - 1
        return m & (torch.arange(m.shape[1], device=m.device)[None] != last)

    def pretrain_losses(self, batch) -> dict:
        cfg, losses = self.cfg, {}
        t_pad = batch["text_mask"][:, 1:] == 0
        # Eq. 1 on the full input; its local features H_I, H_T go unused: reconstruction reads the masked ones
        (h_I, _), (h_T, _) = self.encode_image(batch["image_tokens"]), self.encode_text(batch)
        h_F = self.global_fusion(torch.cat([h_I, h_T], -1))
        B = h_I.shape[0]
        img_m = random_mask(torch.ones(B, self.n_img, dtype=torch.bool, device=h_I.device), cfg.image_mask)
        txt_sel = self._text_positions(batch)
        txt_m = random_mask(txt_sel, cfg.text_mask)
        (h_I2, H_I2), (h_T2, H_T2) = self.encode_image(batch["image_tokens"], img_m), self.encode_text(batch, txt_m)
        y = batch["label"]
        for name, h in (("global", h_F), ("local", self.h_tilde.expand(B, -1))):
            if not self.use[name]:
                continue
            out_i, out_t, logits, _ = self.reconstruct(h, H_I2, H_T2, t_pad)
            losses[f"{name}_img"], losses[f"{name}_txt"] = self._rec_losses(out_i, out_t, batch, img_m, txt_m)
            if (y >= 0).any():  # captions have no answer
                losses[f"{name}_ans"] = F.cross_entropy(logits, y, ignore_index=-1)
        # Contrast only on caption rows: VQA rows describe one aspect of an image, so other images
        # would be false negatives (paper §3.2.3). Under torchrun the rows come from every rank.
        cap, text_ids = gather_rows(batch["is_caption"], batch["text_id"])   # the same on every rank
        if cap.sum() > 1:
            tau = self.log_tau.exp().clamp(0.01, 0.5)
            ids = text_ids[cap]
            if self.use["inter"]:
                g_I, g_T = gather_rows(h_I, h_T)
                losses["inter"] = contra(g_I[cap], g_T[cap], tau, ids) + contra(g_T[cap], g_I[cap], tau, ids)
            if self.use["intra"]:
                with torch.no_grad():  # momentum targets on the full input; the online side is the masked view
                    m_I = self.momentum_image(self._image_tokens(batch["image_tokens"]))[0]  # ĥ_I
                    m_T = self.momentum_text(batch["text_tokens"], None, batch["text_mask"] == 0)[0]
                g_I2, g_T2, m_I, m_T = gather_rows(h_I2, h_T2, m_I, m_T)
                # an image is its own instance whatever its caption says: only the text term masks
                losses["intra"] = contra(g_I2[cap], m_I[cap], tau) + contra(g_T2[cap], m_T[cap], tau, ids)
        return losses

    def sample_lambda(self, n, device):
        kind, _, arg = self.cfg.lam.partition(":")
        if kind == "fixed":
            return torch.full((n,), float(arg), device=device)
        if kind == "beta":
            a, b = (float(x) for x in arg.split(","))
            return torch.distributions.Beta(a, b).sample((n,)).to(device)
        return torch.rand(n, device=device)

    def finetune_losses(self, batch, h_F, h_I, H_I, h_T, H_T, t_pad) -> dict:
        """Rows come in (current, partner) pairs from the group sampler: 0::2 current, 1::2 partner.
        The current sample's local image features are deviated towards a similar image and
        reconstructed (L_diff); heads of the pair are mixed (L_mix). Partners stay clean."""
        losses, B = {}, h_F.shape[0]
        mix = self.use["mixup"] and B >= 2
        cur = torch.zeros(B, dtype=torch.bool, device=h_F.device)
        cur[slice(0, None, 2 if mix else 1)] = True
        if self.use["diff"]:
            H_sim = self.encode_image(batch["similar_image_tokens"])[1]          # Ĥ_I
            eps = torch.rand(B, 1, 1, device=h_F.device)
            H_dev = eps * H_I + (1 - eps) * H_sim                                 # H̃_I (Eq. 8)
            H_I = torch.where(cur[:, None, None], H_dev, H_I)
        out_i, out_t, logits, h_D = self.reconstruct(h_F, H_I, H_T, t_pad)
        if self.use["diff"]:
            all_patches = cur[:, None].expand(-1, self.n_img)
            txt = self._text_positions(batch) & cur[:, None]
            losses["diff_img"], losses["diff_txt"] = self._rec_losses(out_i, out_t, batch, all_patches, txt)
        y = batch["label"]
        if mix:
            a, b = slice(0, B - B % 2, 2), slice(1, B, 2)
            lam = self.sample_lambda(h_D[a].shape[0], h_D.device)[:, None]
            h_mix = lam * h_D[a] + (1 - lam) * h_D[b]                             # Eq. 11
            C = logits.shape[-1]
            onehot = lambda t: F.one_hot(t.clamp(min=0), C).float() * (t >= 0)[:, None]
            target = lam * onehot(y[a]) + (1 - lam) * onehot(y[b])               # Ans_mix (unknown answers weigh 0)
            logp = self.ffn_a(h_mix).float().log_softmax(-1)
            losses["mix"] = -(target * logp).sum(-1).sum() / target.sum().clamp(min=1e-6)
        else:
            losses["ans"] = F.cross_entropy(logits.float(), y, ignore_index=-1)
        return losses

    def encode(self, batch) -> dict:
        """Eq. 1 on the full input: h_F and the encoders' global and local features."""
        (h_I, H_I), (h_T, H_T) = self.encode_image(batch["image_tokens"]), self.encode_text(batch)
        h_F = self.global_fusion(torch.cat([h_I, h_T], -1))
        t_pad = batch["text_mask"][:, 1:] == 0
        return {"h_F": h_F, "h_I": h_I, "H_I": H_I, "h_T": h_T, "H_T": H_T, "t_pad": t_pad}

    # -- the Predictor interface ------------------------------------------------------------------
    def forward_features(self, batch) -> dict:
        """fused = h_D (B, d), RecNet's answer-slot state on the clean input, which FFN_A reads."""
        f = self.encode(batch)
        return {"fused": self.recnet(f["h_F"], f["H_I"], f["H_T"], f["t_pad"])[:, -1]}

    def forward_head(self, fused):
        return self.ffn_a(fused)                                                 # (B, C)

    def forward(self, batch) -> dict:
        if self.training and self.cfg.stage == "pretrain":
            return {"losses": self.pretrain_losses(batch)}
        if self.training and "label" in batch:  # no mixing or deviation at inference
            return {"losses": self.finetune_losses(batch, **self.encode(batch))}
        fused = self.forward_features(batch)["fused"]
        logits = self.forward_head(fused)
        out = {"logits": logits, "fused": fused, "losses": {}}
        if "label" in batch:
            out["losses"]["ans"] = F.cross_entropy(logits, batch["label"], ignore_index=-1)
        return out

    @torch.no_grad()
    def momentum_update(self):
        """After each optimiser step: θ_m ← m·θ_m + (1−m)·θ (pretraining with C_intra only)."""
        if not hasattr(self, "momentum_image"):
            return
        m = self.cfg.momentum
        for online, target in ((self.image_encoder, self.momentum_image), (self.text_encoder, self.momentum_text)):
            for p, q in zip(online.parameters(), target.parameters()):
                q.mul_(m).add_(p.detach(), alpha=1 - m)
