"""A torch Dataset over cached backbone features, and the collate that pads questions."""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from medvqa.data.datasets import normalize_answer


class FeatureDataset(Dataset):
    def __init__(self, records, vocab, image_feats: dict, question_feats: dict, answer_ids: dict | None = None,
                 similar: dict | None = None, views: list | None = None):
        self.records, self.vocab = records, vocab
        self.image_feats, self.question_feats = image_feats, question_feats
        self.answer_ids = answer_ids or {}                    # normalised answer -> token ids (AHead)
        self.similar = similar   # image -> similar images (CMDPI difference reconstruction)
        # Augmented training views 1..K, each like image_feats; an item draws one of the K + 1 views
        # (0 = the image itself).
        self.views = views or []
        # CMDPI reconstruction targets, image -> (3, S, S) uint8, of the image and of each view;
        # set together by medvqa.train.data.attach_pixels.
        self.pixels, self.pixel_views = None, []
        self.image_index = {p: i for i, p in enumerate(sorted({r.image for r in records}))}
        self.text_index = {q: i for i, q in enumerate(sorted({r.question for r in records}))}   # identical text, one id

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        q = self.question_feats[r.question]
        v = random.randrange(len(self.views) + 1) if self.views else 0
        feats = [self.image_feats, *self.views]
        item = {
            "index": i,
            "image_tokens": feats[v][r.image]["tokens"],                  # (1+N, Di)
            "view": v,
            "text_tokens": q["tokens"],                                   # (L, Dt)
            "input_ids": q["input_ids"],                                  # (L,)
            "label": self.vocab.encode(r.answer_norm),
            "is_open": r.answer_type == "OPEN",
            "answer": normalize_answer(r.answer),
            "answer_ids": self.answer_ids.get(r.answer_norm, [0]),
            "image_id": self.image_index[r.image],
            "text_id": self.text_index[r.question],
            "is_caption": bool(r.extra.get("caption")),
        }
        if "pooled" in q:   # absent when the cache holds a text block's input (medvqa.train.tuning)
            item["text_pooled"] = q["pooled"]                             # (Dt,)
        if self.pixels is not None:
            item["pixels"] = [self.pixels, *self.pixel_views][v][r.image]
        if self.similar is not None:
            item["similar_image_tokens"] = feats[v][random.choice(self.similar[r.image])]["tokens"]
        return item


def collate(items: list[dict]) -> dict:
    """Stack a batch; questions are right-padded with a mask (1 = real token)."""
    L = max(it["text_tokens"].shape[0] for it in items)
    B, Dt = len(items), items[0]["text_tokens"].shape[1]
    tokens = torch.zeros(B, L, Dt)
    mask = torch.zeros(B, L, dtype=torch.long)
    ids = torch.zeros(B, L, dtype=torch.long)
    for i, it in enumerate(items):
        n = it["text_tokens"].shape[0]
        tokens[i, :n], mask[i, :n], ids[i, :n] = it["text_tokens"].float(), 1, it["input_ids"]
    optional = {}
    if "pixels" in items[0]:
        optional["pixels"] = torch.stack([it["pixels"] for it in items])                         # (B, 3, S, S) uint8
    if "similar_image_tokens" in items[0]:
        optional["similar_image_tokens"] = torch.stack([it["similar_image_tokens"].float() for it in items])
    if "text_pooled" in items[0]:
        optional["text_pooled"] = torch.stack([it["text_pooled"].float() for it in items])      # (B, Dt)
    return optional | {
        "index": torch.tensor([it["index"] for it in items]),
        "image_tokens": torch.stack([it["image_tokens"].float() for it in items]),   # (B, 1+N, Di)
        "view": torch.tensor([it["view"] for it in items]),                          # (B,) 0 = the image itself
        "text_tokens": tokens, "text_mask": mask, "input_ids": ids,                  # (B, L, Dt), (B, L)
        "label": torch.tensor([it["label"] for it in items]),                        # (B,), -1 = not in vocab
        "is_open": torch.tensor([it["is_open"] for it in items]),
        "answer": [it["answer"] for it in items],
        "answer_ids": _pad([it["answer_ids"] for it in items]),                    # (B, A)
        "image_id": torch.tensor([it["image_id"] for it in items]),
        "text_id": torch.tensor([it["text_id"] for it in items]),
        "is_caption": torch.tensor([it["is_caption"] for it in items]),
    }


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s)
    return out
