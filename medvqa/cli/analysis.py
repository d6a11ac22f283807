"""`pointing-game`, `faithfulness`, `figures`, `umap` and `bench`: how the explanations, the features
and the speed measure up."""
from __future__ import annotations

import json
from pathlib import Path

from medvqa.cli.common import UserError, check_writable, count, print_json, seed, whole


def cmd_pointing_game(a):
    from medvqa.data import load_split
    from medvqa.explain.pointing import pointing_cases, pointing_game
    from medvqa.predict import Predictor

    if not (Path(a.root) / "imgs").is_dir():   # SLAKE's layout: imgs/<case>/detection.json holds the boxes
        raise UserError(f"--root {a.root}: not a SLAKE folder (imgs/ missing); the pointing game needs SLAKE's boxes")
    records = load_split("slake", a.root, a.split).records
    cases = pointing_cases(records)[: a.limit or None]
    preds = {Path(str(c)).name: Predictor.load(c) for c in a.checkpoint}
    res = pointing_game(preds, cases, a.methods, a.layers, progress=not a.json)
    if a.json:
        print_json(res)
        return 0
    print(f"pointing game on SLAKE {a.split}: {res['n']} questions naming a boxed organ or lesion")
    for r in res["results"]:
        lo, hi = r["hit_rate_ci95"]
        v = r["vs_centre"]
        layer = "–" if r["layer"] is None else r["layer"]
        print(f"  {r['model']:24s} {r['method']:15s} layer {layer:>3}  "
              f"hit rate {r['hit_rate']:.2f} [{lo:.2f}–{hi:.2f}]"
              f"  vs centre: {v['only_map']} only the map, {v['only_centre']} only the centre, "
              f"McNemar p = {v['mcnemar_p']:.3g}")
    print(f"  centre-point baseline {res['baseline_center']:.2f}   random-point baseline {res['baseline_random']:.2f}")
    _print_skipped(res)
    return 0


def _print_skipped(res):
    for s in res["skipped"]:
        print(f"  {s['model']:24s} {s['method']}: skipped "
              "(the model has no question-conditioned attention over the image)")


def cmd_faithfulness(a):
    import random

    from medvqa.data import load_split
    from medvqa.explain.faithfulness import deletion_insertion
    from medvqa.predict import Predictor

    records = load_split(a.dataset, a.root, a.split).records
    records = random.Random(a.seed).sample(records, min(a.limit, len(records)))   # a fixed, spread-out sample
    preds = {Path(str(c)).name: Predictor.load(c) for c in a.checkpoint}
    res = deletion_insertion(preds, records, a.methods, a.steps, progress=not a.json)
    if a.json:
        print_json(res)
        return 0
    print(f"deletion / insertion AUC on {a.dataset} {a.split}: {res['n']} questions, {a.steps} steps "
          "(deletion: lower is better; insertion: higher is better)")
    for r in res["results"]:
        (dl, dh), (il, ih) = r["deletion_vs_random_ci95"], r["insertion_vs_random_ci95"]
        print(f"  {r['model']:24s} {r['method']:10s} deletion {r['deletion_auc']:.4f} "
              f"(random {r['deletion_random_auc']:.4f};"
              f" difference 95 % CI {dl:+.4f} to {dh:+.4f})  insertion {r['insertion_auc']:.4f}"
              f" (random {r['insertion_random_auc']:.4f}; {il:+.4f} to {ih:+.4f})")
    _print_skipped(res)
    return 0


def cmd_figures(a):
    from medvqa.figures import make_all

    res = make_all(a.checkpoint, a.dataset, a.root, a.split, a.out, a.cam_cases, not a.no_umap, progress=not a.json)
    if a.json:
        print_json(res)
    else:
        print((Path(a.out) / "accuracy.md").read_text(), end="")
        print(f"wrote {sum(len(v) for v in res['files'].values())} files to {a.out}")
    return 0


def cmd_umap(a):
    from medvqa.data import load_split
    from medvqa.explain.umap import COLORINGS, embed, labels_for, plot, silhouette
    from medvqa.predict import Predictor

    if len(a.checkpoint) > 2:
        raise UserError("give one or two --checkpoint")
    check_writable(a.out, file=True)
    records = load_split(a.dataset, a.root, a.split).records
    panels, out = [], {"n": len(records), "checkpoints": {}}
    for ck in a.checkpoint:
        p = Predictor.load(ck)
        feats, correct = p.features_records(records, progress=not a.json)
        xy = embed(feats, seed=a.seed)
        sil = {c: silhouette(xy, labels_for(records, correct, c)) for c in COLORINGS}
        name = Path(str(ck)).name
        out["checkpoints"][name] = {"silhouette": sil, "accuracy": round(100 * float(correct.mean()), 2)}
        panels.append({"title": name, "xy": xy, "labels": labels_for(records, correct, a.color),
                       "silhouette": sil[a.color]})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    plot(panels, a.color, a.out)
    out["out"] = str(a.out)
    if a.json:
        print_json(out)
    else:
        for name, v in out["checkpoints"].items():
            print(f"{name}: silhouette " + ", ".join(f"{k} {s}" for k, s in v["silhouette"].items()))
        print(f"wrote {a.out}")
    return 0


def cmd_bench(a):
    from medvqa.bench import run

    if a.out:
        check_writable(a.out, file=True)
    res = run()
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))
    if a.json:
        print_json(res)
    else:
        print(json.dumps(res, indent=1))
    return 0


def register(sub):
    from medvqa.data.datasets import DATASETS
    from medvqa.explain import METHOD_NAMES as METHODS

    pg = sub.add_parser("pointing-game", help="does the saliency maximum fall in the named organ's box? (SLAKE)")
    pg.add_argument("--checkpoint", required=True, action="append", help="repeat for several models")
    pg.add_argument("--root", required=True, type=Path, help="the SLAKE folder")
    pg.add_argument("--split", default="test")
    pg.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                    help="default: each model's own map, the one the app shows")
    pg.add_argument("--layers", type=int, nargs="+", default=[None], 
                    help="image-backbone blocks whose input the CAM reads (default: a third of the way in)")
    pg.add_argument("--limit", type=count, help="only the first N qualifying questions")
    pg.add_argument("--json", action="store_true")
    pg.set_defaults(func=cmd_pointing_game)

    fa = sub.add_parser("faithfulness", help="deletion / insertion AUC of saliency maps vs a random order")
    fa.add_argument("--checkpoint", required=True, action="append", help="repeat for several models")
    fa.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    fa.add_argument("--root", required=True, type=Path)
    fa.add_argument("--split", default="test")
    fa.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                    help="default: each model's own map, the one the app shows")
    fa.add_argument("--limit", type=count, default=50, help="questions sampled from the split (seeded)")
    fa.add_argument("--steps", type=count, default=10)
    fa.add_argument("--seed", type=seed, default=0)
    fa.add_argument("--json", action="store_true")
    fa.set_defaults(func=cmd_faithfulness)

    fg = sub.add_parser("figures", help="paper tables and figures: accuracy (md/tex), per-organ / question-type "
                                        "bars, reliability, CAM grid, UMAP pair")
    fg.add_argument("--checkpoint", required=True, action="append", help="repeat for several models")
    fg.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    fg.add_argument("--root", required=True, type=Path)
    fg.add_argument("--split", default="test")
    fg.add_argument("--out", required=True, type=Path, help="folder for the PNG (300 dpi) / SVG / PDF files")
    fg.add_argument("--cam-cases", type=whole, default=4, help="cases in the CAM grid (0: none)")
    fg.add_argument("--no-umap", action="store_true")
    fg.add_argument("--json", action="store_true")
    fg.set_defaults(func=cmd_figures)

    um = sub.add_parser("umap", help="UMAP of fused features of one or two checkpoints, with silhouette scores")
    um.add_argument("--checkpoint", required=True, action="append")
    um.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    um.add_argument("--root", required=True, type=Path)
    um.add_argument("--split", default="test")
    um.add_argument("--color", default="question_type", choices=("question_type", "organ", "answer_type", "correct"))
    um.add_argument("--seed", type=seed, default=0)
    um.add_argument("--out", required=True, type=Path, help=".png, .svg or .pdf")
    um.add_argument("--json", action="store_true")
    um.set_defaults(func=cmd_umap)

    be = sub.add_parser("bench", help="sizes, FLOPs, scan speed-up and answer latency (JSON)")
    be.add_argument("--out", type=Path, help="also write the JSON here")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)
