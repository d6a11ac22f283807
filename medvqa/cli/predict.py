"""`predict` and `explain`: one question (or a CSV of them) answered, and the saliency map of an answer."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from medvqa.cli.common import UserError, colormap, count, fraction, print_json


def _predict_one(p, a):
    from medvqa.calibration import percent

    ans = p.answer(a.image, a.question, top_k=a.top_k)
    if a.json:
        print_json({k: v for k, v in ans.to_dict().items()
                    if k in ("answer", "score", "top_k", "free_text", "kind", "uncertain")})
        return 0
    print(f"answer: {ans.text}  ({percent(ans.score)})" + ("  uncertain" if ans.uncertain else ""))
    for t, s in ans.top_k[1:]:
        print(f"        {t}  ({percent(s)})")
    if ans.free_text is not None:
        print(f"free-form (AHead, generated): {ans.free_text or '(empty)'}")
    return 0


def _predict_csv(p, a):
    """Answer every row of --csv into --out, in the rows' order; a row whose image or question cannot be
    used gets its reason in the error column (and a warning line) instead of stopping the others."""
    import csv

    from tqdm.auto import tqdm

    from medvqa.data import ImageError, InputError, load_image
    from medvqa.data.datasets import csv_rows
    from medvqa.predict import Predictor

    src = Path(a.csv)
    if not src.is_file():
        raise UserError(f"{src}: CSV file not found")
    rows = csv_rows(src)   # a file that is not UTF-8 text: one line
    if not rows:
        raise UserError(f"{src}: no rows under the header image,question[,answer]")
    if not {"image", "question"} <= set(rows[0]):
        raise UserError(f"{src}: CSV needs the columns image, question[, answer]")
    extra = sum(None in r for r in rows)
    rows = [{k: v for k, v in r.items() if k is not None} for r in rows]   # cells past the header have no column
    out_rows, bad = [None] * len(rows), 0
    for i in tqdm(range(0, len(rows), 16), desc="answering", disable=a.json):
        good = []   # (row index, image, question)
        for n, r in enumerate(rows[i:i + 16], i):
            try:
                good.append((n, load_image(src.parent / (r["image"] or "")), Predictor.check_question(r["question"])))
            except (ImageError, InputError) as e:
                print(f"warning: {src.name} row {n + 1}: {e}", file=sys.stderr)
                out_rows[n] = {**r, "prediction": "", "score": "", "error": str(e)}
                bad += 1
        if good:
            answers = p.answer_batch([im for _, im, _ in good], [q for *_, q in good], top_k=a.top_k)
            for (n, *_), ans in zip(good, answers):
                out_rows[n] = {**rows[n], "prediction": ans.text, "score": f"{ans.score:.4f}",
                               "uncertain": "yes" if ans.uncertain else "no", "free_text": ans.free_text or "",
                               "error": ""}
    if extra:
        print(f"warning: {src.name}: {extra} rows have cells past the header; they are left out", file=sys.stderr)
    keys = list(dict.fromkeys(k for r in out_rows for k in r))
    tmp = a.out.with_name(a.out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(out_rows)
    shutil.move(tmp, a.out)
    print(f"wrote {len(out_rows)} answers to {a.out}" + (f" ({bad} rows could not be answered)" if bad else ""),
          file=sys.stderr)
    return 0


def cmd_predict(a):
    from medvqa.predict import Predictor

    if a.csv:   # the arguments first, so that a mistake costs no model load
        if a.image or a.question is not None:
            raise UserError("give --image and --question, or --csv CASES.csv --out ANSWERS.csv, not both")
        if not a.out:
            raise UserError("--csv needs --out ANSWERS.csv")
        if a.out.is_dir():
            raise UserError(f"--out {a.out}: a folder; give the answers' CSV file name")
        if a.out.absolute() == a.csv.absolute():
            raise UserError(f"--out {a.out}: the input CSV itself; give another file name")
        if not a.out.parent.is_dir():
            raise UserError(f"--out {a.out}: no folder {a.out.parent}")
        return _predict_csv(Predictor.load(a.checkpoint), a)
    if not (a.image and a.question is not None):
        raise UserError("give --image and --question, or --csv CASES.csv --out ANSWERS.csv")
    if a.out:
        raise UserError("--out is for --csv; one answer prints on stdout (--json for JSON)")
    return _predict_one(Predictor.load(a.checkpoint), a)


def cmd_explain(a):
    import numpy as np

    from medvqa.data import load_image
    from medvqa.explain import GRADIENT_FREE, overlay
    from medvqa.predict import Predictor

    if a.out.suffix.lower() != ".png":
        raise UserError(f"--out {a.out}: give a .png path (the raw map is written beside it as .npy)")
    p = Predictor.load(a.checkpoint)
    im = load_image(a.image)
    method = a.method or p.default_method
    cam = p.explain(im, a.question, method=method, target=a.target, layer=a.layer)   # a bad --target fails here
    if a.target and method in GRADIENT_FREE:
        print(f"note: {method} is gradient-free, so --target does not change the map", file=sys.stderr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    overlay(im, cam, a.opacity, a.colormap).save(a.out)
    np.save(a.out.with_suffix(".npy"), cam)
    ans = p.answer(im, a.question)
    print(f"{method} for answer {a.target or ans.text!r}: wrote {a.out} and {a.out.with_suffix('.npy')}",
          file=sys.stderr)
    return 0


def register(sub):
    pr = sub.add_parser("predict", help="answer one question, or a CSV of cases")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--image", type=Path)
    pr.add_argument("--question")
    pr.add_argument("--csv", type=Path, help="image,question[,answer] rows; images relative to the CSV")
    pr.add_argument("--out", type=Path)
    pr.add_argument("--top-k", type=count, default=5)
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_predict)

    from medvqa.explain import MODEL_DEFAULT_METHOD, DEFAULT_METHOD, METHOD_NAMES as METHODS

    ex = sub.add_parser("explain", help="saliency map of an answer (Grad-CAM family or attention rollout), "
                                        "as an overlay PNG + raw .npy")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--image", required=True, type=Path)
    ex.add_argument("--question", required=True)
    ex.add_argument("--method", choices=sorted(METHODS), help="default: the model's own, "
                    + ", ".join(f"{v} for {k}" for k, v in MODEL_DEFAULT_METHOD.items()) + f", else {DEFAULT_METHOD}")
    ex.add_argument("--target", help="an answer of the vocabulary (default: the predicted answer)")
    ex.add_argument("--layer", type=int, help="image-backbone block whose input the CAM reads, or where the rollout "
                    "starts (default: a third of the way in; -1: the last; query-attention reads after the backbone)")
    ex.add_argument("--opacity", type=fraction, default=0.5)
    ex.add_argument("--colormap", type=colormap, default="jet")
    ex.add_argument("--out", required=True, type=Path)
    ex.set_defaults(func=cmd_explain)
