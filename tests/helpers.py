"""Tiny synthetic data and checkpoints for unit tests (no real data needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medvqa.config import get_preset
from medvqa.data import AnswerVocab, Record
from medvqa.data.cache import FeatureCache
from medvqa.data.features import FeatureDataset, collate
from medvqa.models.encoders import Encoders
from medvqa.train.data import answer_token_ids

QUESTIONS = ["Is there a fracture?", "Which organ is shown?", "Is this an MRI?", "Where is the lesion?"]
ANSWERS = ["yes", "liver", "no", "left lung"]


def make_cases(root: Path, n: int = 16) -> list[Record]:
    """n records over n//2 synthetic images, the answer a function of the image brightness."""
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        img = root / f"img{i // 2}.png"
        if not img.exists():
            rng = np.random.default_rng(i // 2)
            Image.fromarray((rng.random((48, 40)) * 80 + 40 * (i // 2 % 4)).astype(np.uint8)).save(img)
        q, a = QUESTIONS[i % 4], ANSWERS[(i // 2) % 4] if i % 2 else ANSWERS[i % 4]
        recs.append(Record(str(i), str(img), q, a, "CLOSED" if a in ("yes", "no") else "OPEN",
                           organ=["CHEST", "ABD"][i % 2], question_type=["PRES", "ORGAN"][i % 2], dataset="folder"))
    return recs


def make_cases_csv(root: Path, n: int = 16, extra: tuple = (), n_test: int = 0) -> Path:
    """make_cases plus the `folder` dataset's cases.csv beside the images: image,question,answer,
    the Record fields named in `extra` (e.g. organ), and with n_test > 0 a split column whose last
    n_test rows are test."""
    import csv

    recs = make_cases(root, n)
    split = [["train"]] * (n - n_test) + [["test"]] * n_test if n_test else [[]] * n
    rows = [[Path(r.image).name, r.question, r.answer, *(getattr(r, k) for k in extra)] + s for r, s in zip(recs, split)]
    with open(root / "cases.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "question", "answer", *extra] + (["split"] if n_test else [])] + rows)
    return root / "cases.csv"


def tiny_data(tmp: Path, n: int = 16, preset=None, encoders=None):
    """Cached features of n synthetic cases (the tiny preset and its encoders unless given)."""
    preset = preset or get_preset("tiny")
    enc = encoders or Encoders(preset.encoders)
    recs = make_cases(tmp / "imgs", n)
    vocab = AnswerVocab.build(recs)
    cache = FeatureCache(enc, root=tmp / "cache", progress=False)
    ans = answer_token_ids(enc.tokenizer, sorted({r.answer_norm for r in recs}), preset.cmi_mtl.max_answer_len)
    ds = FeatureDataset(recs, vocab, cache.images([r.image for r in recs]), cache.questions([r.question for r in recs]), ans)
    tok = enc.tokenizer
    specials = [tok.pad_token_id, tok.sep_token_id, tok.unk_token_id]
    ahead_vocab = specials + sorted({i for ids in ans.values() for i in ids} - set(specials))
    return preset, enc, recs, vocab, ds, ahead_vocab


def batch_of(ds, n=8):
    return collate([ds[i] for i in range(min(n, len(ds)))])


def tiny_checkpoint(tmp: Path, model_name: str = "cmi-mtl", steps: int = 3) -> Path:
    from medvqa.models.registry import build
    from medvqa.train.checkpoint import save_checkpoint

    from medvqa.train.data import attach_pixels, pixel_size, text_vocab

    preset, enc, recs, vocab, ds, ahead_vocab = tiny_data(tmp)
    extra = {}
    if model_name == "cmdpi":  # reconstruction targets and difference-reconstruction partners
        attach_pixels(ds, FeatureCache(enc, root=tmp / "cache", progress=False), pixel_size(preset))
        ds.similar = {p: [p] for p in ds.image_index}
        extra["text_vocab"] = text_vocab([ds])
    torch.manual_seed(0)
    model = build(model_name, preset, len(vocab), ahead_vocab=ahead_vocab, **extra)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        out = model(batch_of(ds))
        loss = sum(model.loss_weights.get(k, 1) * v for k, v in out["losses"].items())
        opt.zero_grad()
        loss.backward()
        opt.step()
    cfg = {"model": model_name, "preset": preset.to_dict(), "dataset": "folder", "vocab_protocol": "all",
           "answers": vocab.answers, "ahead_vocab": ahead_vocab, **extra}
    save_checkpoint(tmp / f"ckpt-{model_name}", model.eval(), cfg, {"note": "unit test"})
    return tmp / f"ckpt-{model_name}"
