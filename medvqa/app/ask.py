"""Ask & compare: one image, one question, every shipped model for the chosen dataset side by
side, with top-k confidences, the AHead's free-form answer, agreement, ground truth when known,
and a saliency overlay per model (by default each model's own best-localising map), its method
and target written on the image beside a colour bar, and a switch to hide it."""
from __future__ import annotations

import functools

import gradio as gr
from gradio import FileData

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medvqa.app.common import (BUILTIN, DATASETS, N_SLOTS, answer_markdown, api_file, checkpoints_for, data_root,
                               escape_md, examples, model_title, saliency_figures, top_k_markdown)
from medvqa.data import ImageError, load_image, normalize_answer
from medvqa.encode import MAX_BATCH
from medvqa.explain import BELOW_RANDOM, GRADIENT_FREE, METHOD_NAMES, SLOW_METHODS
from medvqa.explain.neighbours import IndexBuilds, load_index
from medvqa.predict import Predictor, answer_many

OWN_METHOD = "each model's own"   # Predictor.default_method: the selected backbone head's attention
FAST_METHODS = [OWN_METHOD] + [m for m in METHOD_NAMES if m not in SLOW_METHODS]


def method_choices() -> list[tuple[str, str]]:
    """The menu: (label, method); a method that pointed at the named organ less often than a random
    point on SLAKE test says so in its label."""
    return [(f"{m} (below a random point on SLAKE)" if m in BELOW_RANDOM else m, m) for m in FAST_METHODS]


def ask_api(image: FileData, question: str, dataset: str) -> dict:
    """The `ask` API: every model's `predict` object for one image and question."""
    return ask_json(api_file(image, "image"), question, dataset)


def ask_json(image_path: str | None, question: str, dataset: str) -> dict:
    """`ask` on an image file the app holds (an upload, an example)."""
    if not isinstance(dataset, str) or dataset not in DATASETS:   # the API passes JSON through as it came
        raise gr.Error(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not image_path:
        raise gr.Error("upload an image first")
    try:
        im = load_image(image_path, name="the uploaded file")
        cks = checkpoints_for(dataset)
        answers = answer_many([Predictor.load(ck) for ck in cks], im, question)
        out = {ck.name: a.to_dict() for ck, a in zip(cks, answers)}
    except (ImageError, ValueError) as e:
        raise gr.Error(str(e)) from None
    if not out:
        raise gr.Error(f"no trained checkpoint for {dataset} is installed")
    return {"dataset": dataset, "question": question, "models": out}


def _cams(cks, im, question, method, targets, opacity, heatmap=True, predicted=None) -> list:
    """The slots' saliency overlays, each labelled with the method shown: a method a model does not
    support (query-attention on CMDPI) falls back to the model's own, and the label says so. With
    the heatmap off, the plain image. Computed together: models on one backbone share its pass."""
    if not heatmap:
        return [gr.update(visible=True, value=im, label="Saliency: heatmap off") for _ in cks]
    ps = [Predictor.load(ck) for ck in cks]
    ms = [method if method in p.methods else p.default_method for p in ps]
    tgts = [t if t and t != "(predicted answer)" else None for t in targets]
    figs = saliency_figures(ps, im, question, ms, tgts, opacity, predicted)
    out = []
    for m, t, fig in zip(ms, tgts, figs):
        label = f"Saliency: {m}" + ("" if m == method or method == OWN_METHOD
                                    else f" ({method}: not available for this model)")
        if t is not None and m in GRADIENT_FREE:
            label += " (gradient-free: the same map for every answer)"
        out.append(gr.update(visible=True, value=fig, label=label))
    return out


INDEX_BUILDS = IndexBuilds()


def _dataset_folder(dataset: str) -> Path | None:
    root = data_root() / BUILTIN.get(dataset, "")
    return root if dataset in BUILTIN and root.is_dir() else None


def start_index_builds(dataset: str):
    """Build, in the background, the nearest-case index of every model of `dataset` that has none."""
    root = _dataset_folder(dataset)
    for ck in checkpoints_for(dataset) if root else ():
        if load_index(ck) is None:
            INDEX_BUILDS.start(ck, dataset, root)


def _nearest(ck, im, question, dataset, k: int = 4):
    """The model's nearest training cases: a table of their questions, answers and similarities
    (from the shipped or cached index), and their thumbnails when the dataset folder is here (else
    None). A missing index is built in the background; the table then says how far it has got."""
    index, root = load_index(ck), _dataset_folder(dataset)
    if index is None:
        if root is None:
            return "*Nearest training cases: no index for this model, and no dataset folder to build one from.*", None
        INDEX_BUILDS.start(ck, dataset, root)
        prog = INDEX_BUILDS.progress(ck) or {}
        if prog.get("error"):
            return f"*Nearest training cases: building the index failed ({prog['error']}).*", None
        done, total = prog.get("done", 0), prog.get("total")
        return (f"*Nearest training cases: building this model's index in the background "
                f"({done} / {total or '?'} cases); ask again in a while.*", None)
    near = Predictor.load(ck).nearest(im, question, index, k)
    def cell(t):   # dataset text inside a Markdown table row: one line, shown literally
        return escape_md(str(t).replace("\n", " "))
    rows = [f"| {cell(n['question'])} | {cell(n['answer'])} | {n['similarity']:.2f} |" for n in near]
    table = "\n".join(["**Nearest training cases** (this model's features)", "",
                       "| question | answer | cosine |", "|---|---|---|", *rows])
    if root is None:
        return table, None
    thumbs = []
    for n in near:
        try:
            thumbs.append((_thumbnail(str(root / n["image"])), f"{n['answer']} (cos {n['similarity']:.2f})"))
        except ImageError:   # the dataset folder lacks an image the index names: show the others
            pass
    return table, thumbs


@functools.lru_cache(maxsize=64)   # at most 64 × 256² RGB (12 MB); neighbours recur across clicks
def _thumbnail(path: str):
    """A training image as a PIL thumbnail: Gradio serves only files under the app's own folders."""
    thumb = load_image(path)
    thumb.thumbnail((256, 256))
    return thumb


def _preview(file):
    """The uploaded image as it will be read, and the ground truth cleared; an unreadable file says why."""
    try:
        return (load_image(file, name="the uploaded file") if file else None), ""
    except ImageError as e:
        raise gr.Error(str(e)) from None


def run_ask(file, question, dataset, method, opacity, ground_truth, heatmap=True):
    try:
        im = load_image(file, name="the uploaded file") if file else None
    except ImageError as e:
        raise gr.Error(str(e)) from None
    if im is None:
        raise gr.Error("upload an image or pick an example")
    res = ask_json(file, question, dataset)
    # the models that answered, in the app's order (a fine-tune finishing meanwhile changes checkpoints_for)
    cks = [ck for ck in checkpoints_for(dataset) if ck.name in res["models"]][:N_SLOTS]
    answers = [res["models"][ck.name]["answer"] for ck in cks]
    agree = len(set(answers)) == 1
    cams = _cams(cks, im, question, method, [None] * len(cks), opacity, heatmap, predicted=answers)
    outs = []
    for ck, cam in zip(cks, cams):
        a = res["models"][ck.name]
        lines = [f"### {escape_md(model_title(ck))}", answer_markdown(a)]
        if a.get("free_text") is not None:
            lines.append(f"Free-form answer (AHead, generated): *{escape_md(a['free_text']) or '—'}*")
        if ground_truth:
            ok = normalize_answer(a["answer"]) == normalize_answer(ground_truth)
            lines.append(("✅ matches" if ok else "❌ differs from")
                         + f" the ground truth: **{escape_md(ground_truth)}**")
        outs += [gr.update(visible=True, value="\n\n".join(lines)),
                 gr.update(visible=True, value=top_k_markdown(a["top_k"])), cam,
                 gr.update(visible=True, choices=["(predicted answer)"] + Predictor.load(ck).vocab.answers,
                           value="(predicted answer)")]
        table, thumbs = _nearest(ck, im, question, dataset)
        outs += [gr.update(visible=True, value=table), gr.update(visible=thumbs is not None, value=thumbs)]
    outs += [gr.update(visible=False)] * (6 * (N_SLOTS - len(cks)))
    banner = ("" if len(cks) < 2 else
              "**The models agree.**" if agree else "**The models disagree** — compare their saliency maps.")
    return [banner, im, heatmap] + outs


def _recam(slots, file, question, dataset, method, targets, opacity, heatmap) -> list:
    """The maps of `slots` again, in one shared pass; a slot with no model: unchanged."""
    cks = checkpoints_for(dataset)
    have = [i for i in slots if i < len(cks)]
    if not file or not have:
        return [gr.update() for _ in slots]
    try:
        im = load_image(file, name="the uploaded file")
        tgts = [targets[slots.index(i)] for i in have]
        cams = dict(zip(have, _cams([cks[i] for i in have], im, question, method, tgts, opacity, heatmap)))
    except (ImageError, ValueError) as e:
        raise gr.Error(str(e)) from None
    return [cams.get(i, gr.update()) for i in slots]


def recam(slot, file, question, dataset, method, target, opacity, heatmap=True):
    return _recam([slot], file, question, dataset, method, [target], opacity, heatmap)[0]


def recam_all(file, question, dataset, method, opacity, heatmap, *targets):
    """Every slot's map again (the heatmap switched on or off)."""
    return _recam(list(range(len(targets))), file, question, dataset, method, list(targets), opacity, heatmap)


def redraw_if_switched(drawn, file, question, dataset, method, opacity, heatmap, *targets):
    """After an ask: its maps were drawn with the switch as it stood at the click (`drawn`). A switch
    flipped while the ask ran was redrawn first and then overwritten by it, so draw them again."""
    if drawn == heatmap:
        return [gr.update() for _ in targets]
    return recam_all(file, question, dataset, method, opacity, heatmap, *targets)


def first_screen(ex: list[dict]):
    """The first example whose dataset has models, with run_ask's outputs for it: what every
    visitor sees on load, computed once. None when no example has models."""
    for e in ex:
        if checkpoints_for(e["dataset"]):
            inputs = [e["path"], e["question"], e["dataset"], e["answer"]]
            return inputs, run_ask(e["path"], e["question"], e["dataset"], OWN_METHOD, 0.5, e["answer"])
    return None


def build_tab(demo: gr.Blocks):
    ex = examples()
    for ds in BUILTIN:
        start_index_builds(ds)
    # Once, in the background from the start: the app is up at once and the first visitor waits for it at most.
    first = ThreadPoolExecutor(1, thread_name_prefix="first-screen").submit(first_screen, ex)
    with gr.Tab("Ask & compare"):
        gallery = gr.Dataset(components=[gr.Image(visible=False), gr.Textbox(visible=False)],
                             label="Examples (click one)", type="index", visible=bool(ex),
                             samples=[[e["path"], f"{e['dataset']}: {e['question']}"] for e in ex] or [["", ""]])
        with gr.Row():
            with gr.Column(scale=1):
                file = gr.File(label="Image (JPEG, PNG or DICOM)", type="filepath",
                               file_types=["image", ".dcm", ".dicom"])
                preview = gr.Image(label="Image", interactive=False, height=260)
                question = gr.Textbox(label="Question", max_lines=3,
                                      placeholder="e.g. Is there evidence of a pneumothorax?")
                dataset = gr.Radio([(v, k) for k, v in DATASETS.items()], value="vqa-rad", label="Models trained on")
                with gr.Row():
                    method = gr.Dropdown(method_choices(), value=OWN_METHOD, label="Saliency method")
                    opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Overlay opacity")
                heatmap = gr.Checkbox(value=True, label="Heatmap")
                ground_truth = gr.Textbox(label="Ground truth (examples fill it)", interactive=False)
                go = gr.Button("Ask", variant="primary")
            with gr.Column(scale=3):
                banner = gr.Markdown()
                slots = []
                with gr.Row():
                    for i in range(N_SLOTS):
                        with gr.Column(visible=True):
                            md = gr.Markdown(visible=False)
                            lab = gr.Markdown(visible=False)   # calibrated, honestly rounded (never "100 %")
                            cam = gr.Image(label="Saliency", interactive=False, visible=False, height=300,
                                           elem_classes="saliency")
                            tgt = gr.Dropdown(label="Saliency for answer", visible=False, allow_custom_value=False)
                            near_md = gr.Markdown(visible=False)
                            near = gr.Gallery(label="Nearest training cases", visible=False, columns=2, height=260,
                                              elem_classes="nearest")
                            slots.append((md, lab, cam, tgt, near_md, near))
        drawn = gr.State(True)   # the Heatmap switch as the shown maps were drawn
        outputs = [banner, preview, drawn] + [c for s in slots for c in s]
        inputs = [file, question, dataset, method, opacity, ground_truth, heatmap]
        redraw = (redraw_if_switched, [drawn, file, question, dataset, method, opacity, heatmap] + [s[3] for s in slots],
                  [s[2] for s in slots])

        def pick(i):
            e = ex[i]
            return e["path"], e["path"], e["question"], e["dataset"], e["answer"]
        gallery.click(pick, [gallery], [file, preview, question, dataset, ground_truth], api_visibility="private").then(
            run_ask, inputs, outputs, api_visibility="private").then(*redraw, api_visibility="private")

        def on_load():
            try:
                shown = first.result()
            except Exception:   # the first screen is a courtesy: an example that fails leaves the page empty
                shown = None
            return (shown[0] + shown[1]) if shown else [gr.update()] * (4 + len(outputs))
        demo.load(on_load, None, [file, question, dataset, ground_truth] + outputs, api_visibility="private")
        file.upload(_preview, [file], [preview, ground_truth], api_visibility="private")
        for ev in (go.click, question.submit):
            ev(run_ask, inputs, outputs, api_visibility="private").then(*redraw, api_visibility="private")
        for i, (_, _, cam, tgt, _, _) in enumerate(slots):
            tgt.input(lambda *a, i=i: recam(i, *a), [file, question, dataset, method, tgt, opacity, heatmap],
                      [cam], api_visibility="private")
        heatmap.change(recam_all, [file, question, dataset, method, opacity, heatmap] + [s[3] for s in slots],
                       [s[2] for s in slots], api_visibility="private")
        # Concurrent asks run side by side, so that the backbone's micro-batcher can batch them.
        gr.api(ask_api, api_name="ask", concurrency_limit=MAX_BATCH)
