"""Turn a dataset on disk into cached-feature train / validation / test sets."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medvqa.data import AnswerVocab, DataError, dataset_splits, holdout, load_split
from medvqa.data.cache import FeatureCache
from medvqa.data.features import FeatureDataset


@dataclass
class Prepared:
    train: FeatureDataset
    val: FeatureDataset | None
    test: FeatureDataset | None
    vocab: AnswerVocab
    ahead_vocab: list
    selection: str            # what the best epoch is selected on
    problems: list


def answer_token_ids(tokenizer, answers, max_len: int) -> dict:
    """normalised answer -> WordPiece ids ending with the end token ([SEP])."""
    end = tokenizer.sep_token_id
    return {a: tokenizer(a, add_special_tokens=False)["input_ids"][:max_len - 1] + [end] for a in answers}


def held_out(loaded: dict, t) -> tuple[list, list, str]:
    """split name -> Split (train, and validate when the dataset has one), TrainConfig -> (train records,
    held-out records, their name): what selection and calibration use. Without a validation split
    (VQA-RAD) a fixed held-out slice of train questions; the test split is never looked at."""
    if "train" not in loaded:   # a folder CSV whose split column names no row train
        raise DataError(f"no train split to train on (the data has {', '.join(loaded) or 'no split'}): "
                        "mark the rows to train on split=train, or leave the split column out")
    train = loaded["train"].records
    if "validate" in loaded:
        return train, loaded["validate"].records, "the validation split"
    train, val = holdout(train, t.val_fraction, t.slice_seed)
    return train, val, (f"a held-out {t.val_fraction:.0%} of train questions (seed {t.slice_seed})" if val
                        else "none: all of train, the last epoch of a fixed schedule")


def prepare(dataset: str, root, preset, encoders, vocab_protocol: str = "all", cache_root=None,
            progress: bool = True, limit: int | None = None, starts: dict | None = None) -> Prepared:
    """starts: {"image" | "text": block} to cache that block's input instead of the backbone's
    output, for training the blocks from there on (medvqa.train.tuning)."""
    starts = starts or {}
    splits = dataset_splits(dataset, root)
    loaded = {s: load_split(dataset, root, s) for s in splits}
    problems = [f"{s}: {p}" for s, sp in loaded.items() for p in sp.problems]
    train, val, selection = held_out(loaded, preset.train)
    test = loaded["test"].records if "test" in loaded else []
    if limit:
        train, val, test = train[:limit], val[:max(1, limit // 4)], test[:max(1, limit // 4)]
    vocab = (AnswerVocab.build(*[sp.records for sp in loaded.values()]) if vocab_protocol == "all"
             else AnswerVocab.build(loaded["train"].records))
    everything = train + val + test
    cache = FeatureCache(encoders, root=cache_root, progress=progress)
    imgs = cache.images([r.image for r in everything], start=starts.get("image"))
    qs = cache.questions([r.question for r in everything], start=starts.get("text"))
    tok = encoders.tokenizer
    ans_ids = answer_token_ids(tok, sorted({r.answer_norm for r in train}), preset.cmi_mtl.max_answer_len)
    # AHead's compact vocabulary: pad (decoder start), end, unknown, then the pieces of train answers
    specials = [tok.pad_token_id, tok.sep_token_id, tok.unk_token_id]
    pieces = sorted({i for ids in ans_ids.values() for i in ids} - set(specials))
    make = lambda recs: FeatureDataset(recs, vocab, imgs, qs, ans_ids) if recs else None
    if problems and progress:
        print(f"warning: {len(problems)} records skipped, e.g. {problems[0]}", file=sys.stderr)
    tr = make(train)
    if tr is not None:  # augmented views of the training images only: validation and test see the image
        tr.views = [cache.images([r.image for r in train], view=v, start=starts.get("image"))
                    for v in range(1, preset.train.image_views + 1)]
    return Prepared(tr, make(val), make(test), vocab, specials + pieces, selection, problems)


# -- CMDPI: reconstruction targets, similar images, caption corpus, group batches ------------------

def text_vocab(datasets) -> list[int]:
    """FFN_T's compact vocabulary: 0 (= any other id), then every backbone id in the training text."""
    ids = {int(i) for ds in datasets for r in ds.records for i in ds.question_feats[r.question]["input_ids"]}
    return [0] + sorted(ids - {0})


def pixel_size(preset) -> int:
    from medvqa.config import image_grid

    c = preset.cmdpi
    return image_grid(preset.encoders) // c.image_pool * c.pixel_patch


@torch.no_grad()
def similar_images(model, ds, threshold: float, pretrained: bool, backbone=None) -> tuple[dict, dict]:
    """Difference reconstruction's partners: for each training image, the other training images
    whose global feature has cosine > threshold, or the nearest one when none passes. Features are
    the pretrained image encoder's h_I; without pretraining, the backbone's CLS token. `backbone`:
    the tuned blocks (medvqa.train.tuning) when `ds` holds their inputs.
    -> (image -> list of images, summary)."""
    paths = sorted(ds.image_index)
    tokens = torch.stack([ds.image_feats[p]["tokens"].float() for p in paths])        # (I, 1+N, Di)
    if backbone is not None and "image" in backbone.starts:
        backbone.eval()
        tokens = torch.cat([backbone.image_top(tokens[i:i + 64]) for i in range(0, len(paths), 64)])
    model.eval()
    h = torch.cat([model.global_features(tokens[i:i + 64]) for i in range(0, len(paths), 64)]) if pretrained \
        else tokens[:, 0]
    h = F.normalize(h, dim=-1)
    sim = (h @ h.t()).fill_diagonal_(-2.0)                                             # (I, I)
    table, fallback = {}, 0
    for i, p in enumerate(paths):
        hits = (sim[i] > threshold).nonzero().flatten().tolist()
        if not hits or len(paths) == 1:
            hits, fallback = [int(sim[i].argmax())] if len(paths) > 1 else [i], fallback + 1
        table[p] = [paths[j] for j in hits]
    n = [len(v) for v in table.values()]
    return table, {"images": len(paths), "threshold": threshold, "nearest_fallback": fallback,
                   "mean_partners": round(sum(n) / max(1, len(n)), 1),
                    "features": "pretrained h_I" if pretrained else "backbone CLS"}


def attach_pixels(ds: FeatureDataset, cache: FeatureCache, size: int):
    """Pixel-reconstruction targets of the image and of each of its augmented views."""
    paths = [r.image for r in ds.records]
    ds.pixels = cache.pixels(paths, size)
    ds.pixel_views = [cache.pixels(paths, size, view=v) for v in range(1, len(ds.views) + 1)]


def cmdpi_pretrain_set(data: Prepared, preset, encoders, captions: list, cache_root=None, progress=True):
    """Pretraining rows: the training questions (reconstruction only) and the captions
    (reconstruction + contrast), with pixel targets; and one group label per row for batching."""
    cache = FeatureCache(encoders, root=cache_root, progress=progress)
    tr = data.train
    paths = [c.image for c in captions]
    imgs = tr.image_feats | cache.images(paths)
    views = [tv | cache.images(paths, view=v) for v, tv in enumerate(tr.views, 1)]
    qs = tr.question_feats | cache.questions([c.question for c in captions])
    records = tr.records + captions
    ds = FeatureDataset(records, data.vocab, imgs, qs, tr.answer_ids, views=views)
    attach_pixels(ds, cache, pixel_size(preset))
    return ds, ["caption" if r.extra.get("caption") else "vqa" for r in records]


def cmdpi_finetune_set(data: Prepared, preset, encoders, similar: dict | None, cache_root=None, progress=True):
    """Attach pixel targets and the similar-image table to the training set; group labels for head mixup."""
    tr = data.train
    attach_pixels(tr, FeatureCache(encoders, root=cache_root, progress=progress), pixel_size(preset))
    tr.similar = similar
    return tr, [(r.organ.lower(), r.question_type.upper()) for r in tr.records]
