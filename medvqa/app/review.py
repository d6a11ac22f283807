"""Review: a radiologist steps through cases (the example gallery, a built-in test split when
its folder is present, or an uploaded zip of cases.csv + images), records for each model
agree / disagree / corrected answer and a comment, and whether the model's saliency map (its own
default, shown beside the answer and kept with the verdict) points at the wrong place; resumes where
they left off, exports CSV and sees agreement per model and Cohen's κ between reviewers."""
from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import gradio as gr

from medvqa.app.common import (BUILTIN, DATASETS, N_SLOTS, answer_markdown, checkpoints_for, data_root, escape_md,
                               examples, model_title, saliency_figure, touch_cases, unzip_cases,
                               user_checkpoints_dir)
from medvqa.data import DataError, ImageError, load_image, load_split
from medvqa.predict import Predictor, checkpoints_dir
from medvqa.review import VERDICTS, ReviewStore

MAX_CASES = 500


def sources() -> list[str]:
    out = ["examples"] + [f"{d}:test" for d, sub in BUILTIN.items() if (data_root() / sub).is_dir()]
    return out + ["uploaded zip"]


def load_cases(source: str, upload) -> list[dict]:
    if source == "examples":
        return [{"qid": f"ex{i}", "image": e["path"], "question": e["question"], "ground_truth": e.get("answer", "")}
                for i, e in enumerate(examples())]
    if source == "uploaded zip":
        if not upload:
            raise DataError("upload a zip of cases.csv (image,question,answer) and its images first")
        split = load_split("folder", unzip_cases(upload), "test")
    else:
        name = source.split(":")[0]
        split = load_split(name, data_root() / BUILTIN[name], "test")
    return [{"qid": r.qid, "image": r.image, "question": r.question, "ground_truth": r.answer}
            for r in split.records[:MAX_CASES]]


def _source_id(source: str, upload) -> str:
    return f"upload:{Path(upload).name}" if source == "uploaded zip" and upload else source


def known_source(source) -> bool:
    """A source id the tab records under: the examples, a built-in test split or an uploaded zip's."""
    return isinstance(source, str) and (source in ["examples"] + [f"{d}:test" for d in BUILTIN]
                                        or (source.startswith("upload:") and len(source) > len("upload:")))


def known_models() -> set[str]:
    """The models a verdict can be about: checkpoints installed here or fine-tuned here."""
    return {p.parent.name for d in (checkpoints_dir(), user_checkpoints_dir()) for p in d.glob("*/config.json")}


_export_dir: Path | None = None


def export_path() -> Path:
    """reviews.csv in one folder per process (made again if a temp cleaner removed it): each export
    replaces the last rather than leaving a folder per click. Gradio serves a copy of it."""
    global _export_dir
    if _export_dir is None or not _export_dir.is_dir():
        _export_dir = Path(tempfile.mkdtemp(prefix="medvqa-reviews-"))
    return _export_dir / "reviews.csv"


SLOT_WIDTH = 5   # per model: answer, verdict, correction, map, "map points at the wrong place"


def show(cases, idx, dataset, reviewer, source_id, models=None):
    """Outputs: position, image, question, ground truth, then (answer markdown, verdict, correction,
    map, map-wrong box) per slot, then the maps shown as [(method, image) | None] per slot (kept
    to be stored with the verdicts). `models`: the checkpoints fixed at Load (default: `dataset`'s)."""
    if not cases:
        return (["*Load a set of cases.*", None, "", ""] + [gr.update(visible=False)] * (SLOT_WIDTH * N_SLOTS)
                + [[None] * N_SLOTS])
    c = cases[idx]
    done = _reviewed(reviewer, source_id)
    who = escape_md(reviewer.strip()) or "(no name yet)"
    pos = f"**Case {idx + 1} / {len(cases)}** · {len(done)} reviewed by {who}"
    if c["qid"] in done:
        pos += " · ✔ this case is recorded (saving again replaces it)"
    try:
        touch_cases(c["image"])   # its unpacked zip is in use
        im = load_image(c["image"])
    except ImageError as e:
        gr.Warning(str(e))
        im = None
    outs, shown = [], []
    cks = [Path(m) for m in models] if models is not None else checkpoints_for(dataset)
    for i in range(N_SLOTS):
        if i >= len(cks) or im is None:
            outs += [gr.update(visible=False)] * SLOT_WIDTH
            shown.append(None)
            continue
        try:
            p = Predictor.load(cks[i])
            a = p.answer(im, c["question"])
            fig = saliency_figure(p, im, c["question"], p.default_method)
        except (ValueError, OSError) as e:   # a question too long to ask, a checkpoint removed since Load
            why = f"{e}" + ("; Load again to use the checkpoints installed now" if not cks[i].is_dir() else "")
            outs += [gr.update(visible=True, value=f"**{escape_md(cks[i].name)}** cannot answer this case: "
                                                  f"{escape_md(why)} (Skip it)"),
                     # hidden and cleared: the last case's verdict must not stay behind them
                     gr.update(visible=False, value=None), gr.update(visible=False, value=""),
                     gr.update(visible=False, value=None), gr.update(visible=False, value=False)]
            shown.append(None)
            continue
        shown.append((p.default_method, fig))
        outs += [gr.update(visible=True, value=f"**{escape_md(model_title(cks[i]))}**: {answer_markdown(a.to_dict())}"),
                 gr.update(visible=True, value=None), gr.update(visible=True, value=""),
                 gr.update(visible=True, value=fig, label=f"{model_title(cks[i])}'s map: {p.default_method}"),
                 gr.update(visible=True, value=False)]
    return [pos, im, c["question"], f"Ground truth: **{escape_md(c['ground_truth']) or '—'}**"] + outs + [shown]


def build_tab():
    with gr.Tab("Review"):
        gr.Markdown("Step through cases and record, for each model, whether you agree. Reviews are saved "
                    "on this machine (SQLite) under your name; loading the same cases resumes where you left off.")
        cases, idx, shown = gr.State([]), gr.State(0), gr.State([None] * N_SLOTS)
        loaded = gr.State({})   # the source id and the models fixed at Load: what Save records against
        with gr.Row():
            reviewer = gr.Textbox(label="Reviewer name", max_lines=1)
            dataset = gr.Radio([(v, k) for k, v in DATASETS.items()], value="vqa-rad", label="Models trained on")
            source = gr.Dropdown(sources(), value="examples", label="Cases")
            upload = gr.File(label="Cases zip (cases.csv + images)", file_types=[".zip"], type="filepath")
            load = gr.Button("Load cases")
        with gr.Row():
            with gr.Column(scale=1):
                pos = gr.Markdown()
                image = gr.Image(interactive=False, height=320, label="Image")
            with gr.Column(scale=1):
                question = gr.Textbox(label="Question", interactive=False)
                truth = gr.Markdown()
                slots = []
                for i in range(N_SLOTS):
                    ans = gr.Markdown(visible=False)
                    verdict = gr.Radio(list(VERDICTS), label="Your verdict", visible=False)
                    corrected = gr.Textbox(label="Corrected answer (for 'corrected')", visible=False, max_lines=1)
                    cam = gr.Image(interactive=False, visible=False, height=220, label="Map")
                    wrong = gr.Checkbox(label="map points at the wrong place", visible=False)
                    slots.append((ans, verdict, corrected, cam, wrong))
                comment = gr.Textbox(label="Comment", lines=2)
                with gr.Row():
                    prev = gr.Button("◀ Previous")
                    save = gr.Button("Save & next ▶", variant="primary")
                    skip = gr.Button("Skip ▶")
        with gr.Row():
            export = gr.Button("Export CSV")
            csv_file = gr.File(label="Reviews (CSV)", interactive=False)
        summary = gr.Markdown()
        view = [pos, image, question, truth] + [c for s in slots for c in s] + [shown]

        load.click(open_cases, [source, upload, dataset, reviewer], [cases, idx, loaded] + view,
                   api_visibility="private")
        dataset.change(switch_models, [cases, idx, dataset, reviewer, loaded], [loaded] + view,
                       api_visibility="private")
        prev.click(lambda *a: step(a[0], a[1], -1, *a[2:]), [cases, idx, loaded, reviewer], [idx] + view,
                   api_visibility="private")
        skip.click(lambda *a: step(a[0], a[1], 1, *a[2:]), [cases, idx, loaded, reviewer], [idx] + view,
                   api_visibility="private")
        save.click(save_case, [cases, idx, loaded, reviewer, comment, shown]
                   + [c for s in slots for c in (s[1], s[2], s[4])], [idx] + view + [comment], api_visibility="private")

        def on_export():
            store = ReviewStore()
            out = store.export_csv(export_path())
            return str(out), summary_markdown(store.summary())

        export.click(on_export, None, [csv_file, summary], api_visibility="private")
        gr.api(review_api, api_name="review")
        gr.api(review_export_api, api_name="review_export")


def _reviewed(reviewer: str, source_id: str) -> set:
    """The case ids recorded so far; an unreadable database is said, and reviewing goes on (Save says
    again if it cannot write)."""
    if not reviewer.strip():
        return set()
    try:
        return ReviewStore().reviewed(reviewer, source_id)
    except (sqlite3.Error, OSError) as e:
        gr.Warning(f"the review database cannot be read ({e}): recorded cases are not marked")
        return set()


def open_cases(source, upload, dataset, reviewer):
    """Load: the cases, where to resume, and the source id and models fixed for them (`loaded`)."""
    try:
        cs = load_cases(source, upload)
    except (DataError, OSError) as e:
        raise gr.Error(str(e)) from None
    if not cs:
        raise gr.Error("no usable cases in that source")
    loaded = {"source": _source_id(source, upload), "models": [str(p) for p in checkpoints_for(dataset)]}
    done = _reviewed(reviewer, loaded["source"])
    start = next((i for i, c in enumerate(cs) if c["qid"] not in done), 0)   # resume
    return [cs, start, loaded] + show(cs, start, dataset, reviewer, loaded["source"], loaded["models"])


def switch_models(cs, i, dataset, reviewer, loaded):
    """The "Models trained on" radio changed: show the case again with those models, which Save then records."""
    if not cs:
        return [loaded] + show(cs, i, dataset, reviewer, "")
    loaded = {**loaded, "models": [str(p) for p in checkpoints_for(dataset)]}
    return [loaded] + show(cs, i, dataset, reviewer, loaded["source"], loaded["models"])


def step(cs, i, delta, loaded, reviewer):
    j = min(max(i + delta, 0), max(len(cs) - 1, 0))
    return [j] + show(cs, j, None, reviewer, loaded.get("source", ""), loaded.get("models"))


def save_case(cs, i, loaded, reviewer, comment, maps, *slot_values):
    """Save & next: one verdict per model shown (the models fixed in `loaded`, with the maps shown),
    all or none: a missing verdict or corrected answer for any model records nothing."""
    if not cs:
        raise gr.Error("load a set of cases first")
    c, cks = cs[i], [Path(m) for m in loaded["models"]][:N_SLOTS]
    try:
        for k, ck in enumerate(cks):   # before the slow part: the models' answers
            if k >= len(maps) or not maps[k]:   # its slot said why it could not answer
                raise ValueError(f"{ck.name} did not answer this case, so it cannot be recorded: Skip it")
            if not slot_values[3 * k]:
                raise ValueError(f"choose a verdict for {model_title(ck)}")
        im = load_image(c["image"])
        verdicts = []
        for k, ck in enumerate(cks):
            verdict, corr, wrong = slot_values[3 * k: 3 * k + 3]
            method, fig = maps[k]
            answer = Predictor.load(ck).answer(im, c["question"]).text   # the shown one: same checkpoint
            verdicts.append(dict(model=ck.name, verdict=verdict, image=c["image"], question=c["question"],
                                 ground_truth=c["ground_truth"], model_answer=answer, corrected_answer=corr,
                                 comment=comment, map_image=fig, map_method=method, map_wrong=bool(wrong)))
        ReviewStore().record_case(reviewer, loaded["source"], c["qid"], verdicts)
    except (ValueError, ImageError, OSError) as e:   # CheckpointError is a ValueError
        raise gr.Error(str(e)) from None
    except sqlite3.Error as e:   # locked or unwritable: the transaction left nothing recorded
        raise gr.Error(_not_recorded(e)) from None
    return step(cs, i, 1, loaded, reviewer) + [""]


def _not_recorded(e: sqlite3.Error) -> str:
    return f"the review database could not be written ({e}): nothing was recorded, try again"


def review_api(reviewer: str, source: str, qid: str, model: str, verdict: str, corrected_answer: str = "",
               comment: str = "") -> dict:
    """Record one verdict (scripts and tests); returns the summary. Refused: a model not installed or
    fine-tuned here, a source the tab does not record under, a missing case id, an over-long comment."""
    if not (isinstance(model, str) and model in known_models()):
        raise gr.Error(f"unknown model {model!r}: give one of {', '.join(sorted(known_models()))}")
    if not known_source(source):
        raise gr.Error(f"unknown source {source!r}: give examples, "
                       f"{', '.join(f'{d}:test' for d in BUILTIN)} or upload:<zip name>")
    store = ReviewStore()
    try:
        store.record(reviewer, source, qid, model, verdict, corrected_answer=corrected_answer, comment=comment)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    except sqlite3.Error as e:
        raise gr.Error(_not_recorded(e)) from None
    return store.summary(source)


def review_export_api() -> str:
    """All reviews as CSV text (formula-like cells quoted: ReviewStore.csv_text)."""
    return ReviewStore().csv_text()


def summary_markdown(s: dict) -> str:
    if not s["models"]:
        return "*No reviews recorded yet.*"
    lines = ["| model | reviews | agree | map points at the wrong place |", "|---|---|---|---|"]
    lines += [f"| {escape_md(m)} | {v['n']} | {v['agree_pct']}% | {v['map_wrong']} |"
              for m, v in sorted(s["models"].items())]
    for pair, k in s["kappa"].items():
        lines.append(f"\nCohen's κ ({escape_md(pair)}, {k['n']} shared items, agree vs not): "
                     f"**{'undefined' if k['kappa'] is None else k['kappa']}**")
    return "\n".join(lines)
