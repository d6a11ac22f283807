"""Backbone fine-tuning from the feature cache: the top K blocks of a frozen backbone trained in
front of any model (docs/decisions.md, Backbone fine-tuning).

The cache holds the input of block L-K (what the frozen bottom blocks give: medvqa.data.cache), so
a step runs only the K tuned blocks and the final norm, and an image's blocks run once per step
however many of its questions the batch holds. The checkpoint keeps the tuned tensors beside the
model (medvqa.train.checkpoint); the Predictor's backbone has them swapped in (Encoders.load_tuned),
so answers, saliency, nearest cases and UMAP read the tuned backbone with no code of their own.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from medvqa.models.encoders import mean_pool

KINDS = ("image", "text")


def resolve_blocks(value, n_blocks: int, flag: str) -> int:
    """A --tune-*-blocks value ("all" or a count) -> how many top blocks to train."""
    if value in (None, 0, "0"):
        return 0
    if value == "all":
        return n_blocks
    k = int(value) if str(value).isdigit() else -1
    if not 0 <= k <= n_blocks:
        raise ValueError(f"{flag} {value}: use a count from 0 to {n_blocks} (the backbone's blocks) or all")
    return k


def tuned_blocks(train_cfg) -> dict:
    """{"image": K, "text": K} of a TrainConfig whose counts are resolved (resolve_blocks)."""
    return {kind: int(getattr(train_cfg, f"tune_{kind}_blocks")) for kind in KINDS}


def starts(encoders, blocks: dict) -> dict:
    """{"image": K, "text": K} -> {kind: L-K}, the first tuned block of each backbone (K > 0 only)."""
    return {kind: len(encoders.blocks(kind)) - k for kind, k in blocks.items() if k}


class TunedBackbone(nn.Module):
    """model ∘ (trainable copies of each backbone's top blocks + final norm). Reads a batch of
    cached block inputs and hands `model` the backbone outputs, as the frozen cache would."""

    def __init__(self, model: nn.Module, encoders, blocks: dict):
        super().__init__()
        self.model, self.loss_weights = model, model.loss_weights
        if hasattr(model, "momentum_update"):   # CMDPI's momentum encoders, stepped by the trainer
            self.momentum_update = model.momentum_update
        self.starts = starts(encoders, blocks)
        names = {m: n for n, m in encoders.named_modules()}
        self.prefixes = {}                      # own tensor-name prefix -> the encoders' one
        for kind, start in self.starts.items():
            tower = encoders.blocks(kind)
            self.add_module(f"{kind}_blocks", copy.deepcopy(tower[start:]).requires_grad_(True))
            self.add_module(f"{kind}_norm", copy.deepcopy(encoders.final_norm(kind)).requires_grad_(True))
            self.prefixes |= {f"{kind}_blocks.{j}.": f"{names[b]}." for j, b in enumerate(tower[start:])}
            if encoders.final_norm(kind) in names:  # an nn.Identity stand-in has no tensors to map
                self.prefixes[f"{kind}_norm."] = f"{names[encoders.final_norm(kind)]}."
        # The pretrained values of the tuned tensors, which the checkpoint stores differences from.
        self.base = {k: v.detach().clone() for k, v in encoders.state_dict().items()
                     if any(k.startswith(p) for p in self.prefixes.values())}
        self.text_config = encoders.text.config  # the text blocks' attention-mask format
        self.pretrained_prefixes = tuple(f"{kind}_{part}." for kind in self.starts for part in ("blocks", "norm"))

    def image_top(self, h):
        """(U, 1+N, Di) inputs of block L-K -> the backbone's output tokens."""
        for b in self.image_blocks:
            h = b(h)
        return self.image_norm(h)

    def text_top(self, h, mask):
        """(B, L, Dt) inputs of text block L-K, (B, L) mask -> (B, L, Dt) output states."""
        from transformers.masking_utils import create_bidirectional_mask

        m = create_bidirectional_mask(config=self.text_config, inputs_embeds=h, attention_mask=mask)
        for b in self.text_blocks:
            h = b(h, m)
        return self.text_norm(h)

    def backbone_outputs(self, batch: dict) -> dict:
        out = dict(batch)
        if "image" in self.starts:
            # Each distinct (image, view) once: the questions of an image share its blocks' pass.
            key = batch["image_id"] * (int(batch["view"].max()) + 1) + batch["view"]                 # (B,)
            uniq, inv = torch.unique(key, return_inverse=True)
            first = torch.zeros(len(uniq), dtype=torch.long, device=key.device).scatter_(
                0, inv, torch.arange(len(inv), device=key.device))                                    # (U,)
            out["image_tokens"] = self.image_top(batch["image_tokens"][first])[inv]                   # (B, 1+N, Di)
            if "similar_image_tokens" in batch:                                                       # CMDPI partners
                out["similar_image_tokens"] = self.image_top(batch["similar_image_tokens"])
        if "text" in self.starts:
            out["text_tokens"] = self.text_top(batch["text_tokens"], batch["text_mask"])              # (B, L, Dt)
            out["text_pooled"] = mean_pool(out["text_tokens"], batch["text_mask"])                    # (B, Dt)
        return out

    def forward(self, batch: dict) -> dict:
        return self.model(self.backbone_outputs(batch))

    def backbone_tensors(self) -> dict:
        """The tuned tensors under the encoders' own state-dict names (for Encoders.load_tuned)."""
        out = {}
        for name, t in self.state_dict().items():
            own = next((p for p in self.prefixes if name.startswith(p)), None)
            if own is not None:
                out[self.prefixes[own] + name[len(own):]] = t
        return out


def load_trained(ckpt, encoders) -> nn.Module:
    """A checkpoint's model as its training ran it: behind its tuned blocks (swapped into
    `encoders` first), reading cached block inputs; the plain model when nothing was tuned."""
    from medvqa.config import preset_from_dict
    from medvqa.train.checkpoint import load_checkpoint, load_tuned

    model, cfg, _ = load_checkpoint(ckpt)
    tensors = load_tuned(ckpt, encoders.state_dict())
    if tensors is None:
        return model
    tuned = TunedBackbone(model, encoders, tuned_blocks(preset_from_dict(cfg["preset"]).train))   # pretrained base
    encoders.load_tuned(tensors)
    own = {enc: mine for mine, enc in tuned.prefixes.items()}
    tuned.load_state_dict({next(own[p] + k[len(p):] for p in own if k.startswith(p)): v for k, v in tensors.items()},
                          strict=False)
    return tuned.eval()
