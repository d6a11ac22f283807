"""`data stats` and `eval`: what a dataset holds, and how well a checkpoint or a predictions file answers it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from medvqa.cli.common import UserError, check_writable, print_json
from medvqa.data import AnswerVocab, dataset_splits, load_split


def _warn_skipped(split_name: str, split, quiet=False):
    for line in split.problems[:20]:
        print(f"warning: skipped {line}", file=sys.stderr)
    if len(split.problems) > 20:
        print(f"warning: … and {len(split.problems) - 20} more skipped records in {split_name}", file=sys.stderr)


def vocab_for(dataset: str, root, protocol: str) -> AnswerVocab:
    """'all': every split's answers (the published protocol); 'train': train answers only."""
    splits = dataset_splits(dataset, root) if protocol == "all" else ("train",)
    return AnswerVocab.build(*[load_split(dataset, root, s).records for s in splits])


def cmd_data_stats(a):
    out = {"dataset": a.dataset, "root": str(a.root), "splits": {}}
    loaded = {}
    for s in dataset_splits(a.dataset, a.root):
        sp = load_split(a.dataset, a.root, s)
        loaded[s] = sp
        _warn_skipped(s, sp)
        recs = sp.records
        out["splits"][s] = {
            "n": len(recs) + len(sp.problems), "usable": len(recs),
            "n_open": sum(r.answer_type == "OPEN" for r in recs),
            "n_closed": sum(r.answer_type == "CLOSED" for r in recs),
            "n_images": len({r.image for r in recs}), "skipped": len(sp.problems),
        }
    v_all = AnswerVocab.build(*[sp.records for sp in loaded.values()])
    out["vocab"] = {"all": len(v_all)}
    if "train" in loaded:
        v_train = AnswerVocab.build(loaded["train"].records)
        out["vocab"]["train"] = len(v_train)
        out["oov_under_train_vocab"] = {
            s: {"n": v_train.oov(sp.records), "open": v_train.oov([r for r in sp.records if r.answer_type == "OPEN"])}
            for s, sp in loaded.items() if s != "train"}
    if a.json:
        print_json(out)
        return 0
    print(f"{a.dataset} at {a.root}")
    for s, st in out["splits"].items():
        print(f"  {s:9s} {st['n']:6d} QA ({st['n_closed']} closed / {st['n_open']} open) "
              f"on {st['n_images']} images" + (f", {st['skipped']} skipped (see warnings)" if st["skipped"] else ""))
    print(f"  answer vocabulary: {out['vocab']['all']} (all splits)"
          + (f", {out['vocab']['train']} (train only)" if "train" in out["vocab"] else ""))
    for s, o in out.get("oov_under_train_vocab", {}).items():
        print(f"  {s}: {o['n']} answers ({o['open']} open) are not in the train-only vocabulary")
    return 0


def _read_predictions(path: Path) -> tuple[dict, dict | None]:
    """JSON of qid -> answer, or qid -> {"answer": …, "score": …}."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: predictions file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object of qid -> answer")
    preds, conf = {}, {}
    for qid, v in raw.items():
        if isinstance(v, dict):
            preds[str(qid)] = str(v.get("answer", ""))
            if "score" in v:   # a probability: anything else would make the ECE meaningless
                score = v["score"]
                if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
                    raise UserError(f"{path}: question {qid}: score {score!r} is not a probability in [0, 1]")
                conf[str(qid)] = float(score)
        else:
            preds[str(qid)] = str(v)
    return preds, (conf or None)


def _open_answers(source, from_file: bool):
    """A predictions JSON (read now) or a checkpoint (name or folder, loaded now), so that a bad
    source fails in one line before any model answers a question -> (preds, conf) or a Predictor."""
    if from_file:
        return _read_predictions(source)
    from medvqa.predict import Predictor

    return Predictor.load(source)


def _answers(a, records, source):
    """Answers of an opened source to `records` -> (qid -> answer, qid -> confidence or None,
    the Predictor or None, qid -> confidence before temperature scaling or None); a checkpoint's
    confidence is calibrated by its temperature, as the app shows it."""
    if isinstance(source, tuple):
        return *source, None, None
    logits = source.logits_records(records, progress=not a.json)
    return *source.read_logits(records, logits), source, source.read_logits(records, logits, 1.0)[1]


def cmd_eval(a):
    from medvqa.calibration import describe
    from medvqa.eval import evaluate, paired_comparison, seen_in_train, swap_images

    if a.by == "seen":
        if a.split == "train":
            raise UserError("--by seen compares a split with the train split: give --split test (or validate)")
        have = dataset_splits(a.dataset, a.root)
        if {"train", a.split} - set(have):
            raise UserError(f"--by seen needs separate 'train' and '{a.split}' splits; {a.root} has {', '.join(have)}")
    if a.swap_images and a.predictions:
        raise UserError("--swap-images needs --checkpoint: a predictions file cannot answer other images")
    split = load_split(a.dataset, a.root, a.split)
    _warn_skipped(a.split, split)
    mine = _open_answers(a.predictions or a.checkpoint, bool(a.predictions))
    other = _open_answers(a.against, Path(a.against).is_file()) if a.against else None
    for path, source in ((a.predictions, mine), (a.against, other)):   # before any model answers (its bar)
        if isinstance(source, tuple) and not any(r.qid in source[0] for r in split.records):
            raise UserError(f"{path}: none of its question ids is in {a.dataset} {a.split}")
    if not isinstance(mine, tuple) and mine.config.get("dataset") not in (None, a.dataset):
        print(f"warning: {a.checkpoint} was trained on {mine.config['dataset']}, not {a.dataset}: its answer "
              "vocabulary is that dataset's", file=sys.stderr)
    preds, conf, p, conf_t1 = _answers(a, split.records, mine)
    vocab, vocab_name = (p.vocab, p.config.get("vocab_protocol", "?")) if p is not None \
        else (vocab_for(a.dataset, a.root, a.vocab), a.vocab)
    seen = seen_in_train(split.records, load_split(a.dataset, a.root, "train").records) if a.by == "seen" else None
    res = evaluate(split.records, preds, conf, seen)
    if res["missing_predictions"]:
        print(f"warning: {a.predictions} answers {res['n'] - res['missing_predictions']} of {res['n']} questions of "
              f"{a.dataset} {a.split}; the {res['missing_predictions']} without an answer count as wrong", file=sys.stderr)
    if p is not None:
        res["calibration"] = {"temperature": p.temperature, "temperature_yes_no": p.config.get("temperature_yes_no"),
                              "source": p.config.get("temperature_source", "none: never fitted (T = 1)"),
                              "ece_before": evaluate(split.records, preds, conf_t1).get("ece"),
                              "ece_after": res.get("ece")}
    if a.swap_images:  # the same questions, each with another image; scored against its own answer
        swapped = p.predict_records(swap_images(split.records), progress=not a.json)[0]
        blind = evaluate(split.records, swapped, None, seen)
        changed = sum(swapped[r.qid] != preds[r.qid] for r in split.records)
        keep = ("open", "closed", "overall", "by_organ", "by_question_type", "by_seen")
        res["swapped_images"] = {k: blind[k] for k in keep if k in blind} | {
            "answers_changed": round(100 * changed / len(split.records), 2)}
    res.update({"vocab": len(vocab), "vocab_protocol": vocab_name, "oov": vocab.oov(split.records),
                "skipped": len(split.problems), "dataset": a.dataset, "split": a.split})
    if other is not None:
        res["against"] = {"source": str(a.against)} | paired_comparison(
            split.records, preds, _answers(a, split.records, other)[0])
    if a.json:
        print_json(res)
        return 0
    lo, hi = res["overall_ci95"]
    print(f"{a.dataset} {a.split}: open {res['open']:.2f}  closed {res['closed']:.2f}  overall {res['overall']:.2f}"
          f" [95 % CI {lo:.2f}–{hi:.2f}]  (n={res['n']}: {res['n_open']} open / {res['n_closed']} closed)")
    print(f"vocabulary: {res['vocab']} answers ({vocab_name}); {res['oov']} {a.split} answers are out of vocabulary")
    if "calibration" in res:
        c = res["calibration"]
        print(f"ECE of top-1 confidence: {c['ece_before']:.2f} before temperature scaling, {c['ece_after']:.2f} after "
              f"({describe(p.config)}; {c['source']})")
    elif "ece" in res:
        print(f"ECE of top-1 confidence: {res['ece']:.2f}")
    key = {"organ": "by_organ", "question_type": "by_question_type", "seen": "by_seen"}.get(a.by)

    def print_groups(r):  # one line per group of `--by`, in the same columns for both passes
        if key:
            w = max(24, *map(len, res[key]))
            for k, v in r[key].items():
                print(f"  {k:{w}s} {v['acc']:6.2f}  (n={v['n']})")

    print_groups(res)
    if a.swap_images:
        b = res["swapped_images"]
        print(f"with another question's image: open {b['open']:.2f}  closed {b['closed']:.2f}  "
              f"overall {b['overall']:.2f};"
              f" {b['answers_changed']:.2f} % of answers changed")
        print_groups(b)
    if a.against:
        c = res["against"]
        print(f"against {a.against} ({c['b']:.2f}): {c['difference']:+.2f} points, paired bootstrap 95 % CI "
              f"{c['difference_ci95'][0]:+.2f} to {c['difference_ci95'][1]:+.2f}; "
              f"only this one right on {c['only_a_right']}, "
              f"only the other on {c['only_b_right']}: McNemar exact p = {c['mcnemar_p']:.3g}")
    return 0


def cmd_index(a):
    """The nearest-case index of a checkpoint over a training split: into assets/neighbours/ for a
    shipped checkpoint (the app then shows the cases without the dataset folder), else the user cache."""
    from medvqa.data import load_split
    from medvqa.explain.neighbours import SHIPPED_INDEXES, cached_index_path, build_index, save_index
    from medvqa.predict import SHIPPED, Predictor

    if a.out:
        check_writable(a.out, file=True)
    p = Predictor.load(a.checkpoint)
    if not a.root.exists():
        raise UserError(f"{a.root}: dataset folder not found")
    records = load_split(a.dataset, a.root, a.split).records
    shipped = p.path.parent == SHIPPED.resolve()
    out = a.out or (SHIPPED_INDEXES / f"{p.path.name}.npz" if shipped else cached_index_path(p.path))
    index = build_index(p, records, a.root, progress=not a.json)
    save_index(index, out)
    res = {"checkpoint": p.path.name, "dataset": a.dataset, "split": a.split, "cases": len(records),
           "dim": int(index["features"].shape[1]), "out": str(out), "mb": round(out.stat().st_size / 1e6, 2)}
    if a.json:
        print_json(res)
    else:
        print(f"wrote {out}: {res['cases']} {a.split} cases × {res['dim']} fp16 features, {res['mb']} MB")
    return 0


def register(sub):
    from medvqa.data.datasets import DATASETS

    def dataset_args(sp, split=True):
        sp.add_argument("--dataset", required=True, choices=sorted(DATASETS))
        sp.add_argument("--root", required=True, type=Path, help="dataset folder (or CSV file for 'folder')")
        if split:
            sp.add_argument("--split", default="test")

    data = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="data_cmd", required=True)
    st = data.add_parser("stats", help="counts, answer types, vocabulary sizes, out-of-vocabulary answers")
    dataset_args(st, split=False)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_data_stats)

    ix = sub.add_parser("index", help="precompute a checkpoint's nearest-case index (training-case features, "
                                      "no images)")
    ix.add_argument("--checkpoint", required=True)
    dataset_args(ix, split=False)
    ix.add_argument("--split", default="train")
    ix.add_argument("--out", type=Path,
                    help="default: assets/neighbours/NAME.npz for a shipped checkpoint, else the cache")
    ix.add_argument("--json", action="store_true")
    ix.set_defaults(func=cmd_index)

    ev = sub.add_parser("eval", help="accuracy open/closed/overall of a checkpoint or a predictions file")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path)
    src.add_argument("--predictions", type=Path, help="JSON of qid -> answer (or {answer, score})")
    dataset_args(ev)
    ev.add_argument("--vocab", choices=("all", "train"), default="all",
                    help="vocabulary used to count out-of-vocabulary answers with --predictions")
    ev.add_argument("--by", choices=("organ", "question_type", "seen"),
                    help="accuracy per group; seen: whether the question's image carries the same answer "
                         "among the train questions")
    ev.add_argument("--against", metavar="CHECKPOINT_OR_JSON",
                    help="a second model (checkpoint, or predictions JSON) on the same questions: the accuracy "
                         "difference with a paired-bootstrap 95 %% CI and McNemar's exact test")
    ev.add_argument("--swap-images", action="store_true",
                    help="also answer every question with another image of the split (a fixed random draw, "
                         "never its own): what is still right comes from the question alone; prints that "
                         "accuracy and how many answers changed")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)
