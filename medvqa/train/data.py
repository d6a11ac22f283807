"""Turn a dataset on disk into cached-feature train / validation / test sets."""
from __future__ import annotations

import sys
from dataclasses import dataclass

from medvqa.data import AnswerVocab, dataset_splits, holdout, load_split
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


def prepare(dataset: str, root, preset, encoders, vocab_protocol: str = "all", cache_root=None,
            progress: bool = True, limit: int | None = None) -> Prepared:
    splits = dataset_splits(dataset, root)
    loaded = {s: load_split(dataset, root, s) for s in splits}
    problems = [f"{s}: {p}" for s, sp in loaded.items() for p in sp.problems]
    train = loaded["train"].records
    if "validate" in loaded:
        val, selection = loaded["validate"].records, "the validation split"
    else:  # VQA-RAD: a fixed held-out slice of train, by image; the test split is never looked at
        train, val = holdout(train, preset.train.val_fraction, preset.train.seed)
        selection = f"a held-out {preset.train.val_fraction:.0%} of train questions (seed {preset.train.seed})"
    test = loaded["test"].records if "test" in loaded else []
    if limit:
        train, val, test = train[:limit], val[:max(1, limit // 4)], test[:max(1, limit // 4)]
    vocab = (AnswerVocab.build(*[sp.records for sp in loaded.values()]) if vocab_protocol == "all"
             else AnswerVocab.build(loaded["train"].records))
    everything = train + val + test
    cache = FeatureCache(encoders, root=cache_root, progress=progress)
    imgs = cache.images([r.image for r in everything])
    qs = cache.questions([r.question for r in everything])
    tok = encoders.tokenizer
    ans_ids = answer_token_ids(tok, sorted({r.answer_norm for r in train}), preset.cmi_mtl.max_answer_len)
    # AHead's compact vocabulary: pad (decoder start), end, unknown, then the pieces of train answers
    specials = [tok.pad_token_id, tok.sep_token_id, tok.unk_token_id]
    pieces = sorted({i for ids in ans_ids.values() for i in ids} - set(specials))
    make = lambda recs: FeatureDataset(recs, vocab, imgs, qs, ans_ids) if recs else None
    if problems and progress:
        print(f"warning: {len(problems)} records skipped, e.g. {problems[0]}", file=sys.stderr)
    return Prepared(make(train), make(val), make(test), vocab, specials + pieces, selection, problems)
