"""Fine-tune: train a model on a built-in dataset or uploaded cases in a background thread with
the project's one trainer (`medvqa train`), with a time estimate first, a live loss / accuracy
plot, and cancel. One run at a time per app. The checkpoint is written whole at the end (a
cancelled run writes nothing) under the user data dir and then shows up in Ask."""
from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from pathlib import Path

import gradio as gr
from gradio import FileData

from medvqa.calibration import describe
from medvqa.app.common import (BUILTIN, api_file, checkpoints_dir, data_root, escape_md, unzip_cases,
                               user_checkpoints_dir)
from medvqa.models.cmdpi import STAGE_ABLATIONS
from medvqa.models.cmi_mtl import ABLATIONS as CMI_ABLATIONS
from medvqa.train.trainer import Callbacks

MAX_CPU_EPOCHS = 10
MODELS = ("baseline", "cmi-mtl", "cmdpi")
PRESETS = ("offline", "tiny")   # `paper` needs the hub backbones and a GPU: the command line's
MAX_TUNE_BLOCKS = 2             # backbone blocks the tab trains at most (its slider)
MAX_LR = 1.0                    # far above any sane rate; 1e10 overflowed float32 mid-run


class Job:
    """The one background run: its thread, a cancel flag, and what the UI polls."""

    def __init__(self):
        self.lock = threading.Lock()
        self.thread, self.cancel = None, threading.Event()
        self.state = {"status": "idle"}

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


JOB = Job()


def sources() -> list[str]:
    return [d for d, sub in BUILTIN.items() if (data_root() / sub).is_dir()] + ["uploaded zip"]


def estimate_seconds(model: str, dataset: str, preset: str, epochs: int) -> float | None:
    """From the shipped checkpoint of the same model and dataset: its seconds per epoch (CPU,
    offline preset). Tiny runs take seconds; other combinations have no reference."""
    if preset == "tiny":
        return 5.0 * epochs
    ref = checkpoints_dir() / f"{model}-{dataset}" / "metrics.json"
    if not ref.is_file():
        return None
    m = json.loads(ref.read_text())
    return m["train_seconds"] / max(1, m["epochs"]) * epochs if m.get("train_seconds") else None


def _run_dir(name: str):
    """A fine-tune's work folder (logs, resumable state), beside the user checkpoints."""
    return user_checkpoints_dir().parent / "runs" / name


def _argv(model, source, upload, preset, epochs, lr, ablate, name, tune_image_blocks=0):
    if source == "uploaded zip":
        if not upload:
            raise ValueError("upload a zip of cases.csv (image,question,answer[,split]) and its images first")
        dataset, root = "folder", unzip_cases(upload)
    else:   # start() checked the source
        dataset, root = source, data_root() / BUILTIN[source]
    out = user_checkpoints_dir() / name
    argv = ["train", "--model", model, "--preset", preset, "--dataset", dataset, "--root", str(root),
            "--out", str(out), "--workdir", str(_run_dir(name)),
            "--epochs", str(int(epochs)), "--lr", str(float(lr)),
            "--tune-image-blocks", str(int(tune_image_blocks or 0)),
            "--no-resume", "--json"]
    return argv + (["--ablate", *ablate] if ablate else []), out


def _fresh_name(stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`, … whichever has neither a checkpoint nor a run folder yet: two
    runs started within one second must not share a folder (the second would overwrite the first)."""
    name, n = stem, 1
    while (user_checkpoints_dir() / name).exists() or _run_dir(name).exists():
        n += 1
        name = f"{stem}-{n}"
    return name


def _number(v, what: str) -> float:
    """A box's or slider's value as a number: an emptied box sends None, the API anything."""
    if v is None or v == "":
        raise ValueError(f"give a {what}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{v!r} is not a {what}") from None


def _check_cases(source, root, preset) -> list[str]:
    """Read the cases' rows (no images decoded) as training will, so that a set with nothing to train on
    is refused here with the reason, not after the backbones load -> the rows that will be skipped."""
    from medvqa.config import get_preset
    from medvqa.data import dataset_splits, load_split
    from medvqa.train.data import held_out

    dataset = "folder" if source == "uploaded zip" else source
    loaded = {s: load_split(dataset, root, s) for s in dataset_splits(dataset, root)}
    train, val, _ = held_out(loaded, get_preset(preset).train)   # no train split: a DataError saying so
    # an uploaded zip's temporary folder means nothing to the user: name its files as in the zip
    problems = [p.replace(f"{Path(root).parent}/", "") for s, sp in loaded.items() if s != "test" for p in sp.problems]
    if not loaded["train"].records:
        raise ValueError("no usable training cases: " + (f"{len(problems)} rows skipped, e.g. {problems[0]}"
                                                         if problems else "the CSV has no rows"))
    if not train:   # one case: the held-out slice takes it
        raise ValueError(f"too few usable training cases ({len(val)}): give at least 2, as some are held out to "
                         "pick the epoch and fit the confidence temperature")
    return problems


def start(model, source, upload, preset, epochs, lr, ablate, tune_image_blocks=0) -> str:
    """Start a run (raises ValueError when one is going or the settings are bad) -> checkpoint name."""
    import torch

    from medvqa.cli import build_parser
    from medvqa.cli.common import is_user_error, parse

    # every choice checked here: argparse would exit (SystemExit) on a bad one, and errors in the run show late
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    epochs = _number(epochs, "number of epochs")
    if not (epochs >= 1 and epochs.is_integer()):
        raise ValueError(f"number of epochs {epochs:g}: use a whole number of 1 or more")
    if not torch.cuda.is_available() and epochs > MAX_CPU_EPOCHS:
        raise ValueError(f"on CPU keep runs short: at most {MAX_CPU_EPOCHS} epochs")
    lr = _number(lr, "learning rate")
    if not 0 < lr <= MAX_LR:
        raise ValueError(f"learning rate {lr:g}: use a value in (0, {MAX_LR:g}], e.g. 2e-4")
    tune_image_blocks = _number(tune_image_blocks or 0, "number of image-backbone blocks")
    if tune_image_blocks not in range(MAX_TUNE_BLOCKS + 1):
        raise ValueError(f"image-backbone blocks to train {tune_image_blocks:g}: use 0 to {MAX_TUNE_BLOCKS}")
    known, ablate = ABLATIONS.get(model, ()), ablate or []
    if not isinstance(ablate, (list, tuple)) or any(x not in known for x in ablate):
        raise ValueError(f"{model} has the ablations {', '.join(known) or '(none)'}")
    if source not in sources():
        raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(sources())}")
    with JOB.lock:
        if JOB.busy():
            raise ValueError("a fine-tuning run is already going: wait for it or cancel it")
        name = _fresh_name(f"{model}-{source.split()[0]}-ft-{time.strftime('%Y%m%d-%H%M%S')}")
        argv, out = _argv(model, source, upload, preset, epochs, lr, ablate, name, tune_image_blocks)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                ns = parse(build_parser(), argv)
        except SystemExit:   # a value the checks above let through: argparse exits, which must not reach the server
            raise ValueError(f"the settings were refused: {err.getvalue().strip().removeprefix('error: ')}") from None
        skipped = _check_cases(source, ns.root, preset)
        JOB.cancel.clear()
        state = {"status": "running", "name": name, "out": str(out), "step": 0, "total": 0, "history": [],
                 "started": time.time(), "skipped": skipped}

        def on_step(step, total, losses):
            state.update(step=step, total=total, loss=losses.get("loss"))

        def on_epoch(epoch, metrics):
            state["history"].append(metrics)

        ns.callbacks = Callbacks(on_step=on_step, on_epoch=on_epoch, should_stop=JOB.cancel.is_set)

        def run():
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # --json output is for terminals
                    rc = ns.func(ns)
                state["status"] = "cancelled" if rc == 130 else "done"
            except (Exception, SystemExit) as e:  # shown in the tab; the app keeps serving
                # a user's mistake reads as a plain message, a fault of ours with its type
                state.update(status="failed", error=str(e) if is_user_error(e, ns) else f"{e.__class__.__name__}: {e}")
            state["seconds"] = round(time.time() - state["started"], 1)

        JOB.state = state
        JOB.thread = threading.Thread(target=run, name="medvqa-finetune", daemon=True)
        JOB.thread.start()
        return name


def status() -> dict:
    s = dict(JOB.state)
    s["history"] = list(s.get("history", []))
    return s


def _status_markdown(s: dict) -> str:
    if s["status"] == "idle":
        return "*No run yet.*"
    line = f"**{s['name']}** — {s['status']}"
    if s.get("total"):
        line += f" · step {s['step']} / {s['total']} ({100 * s['step'] / s['total']:.0f}%)"
    if s.get("loss") is not None:
        line += f" · loss {s['loss']:.3f}"
    if s.get("skipped"):
        line += f"\n\nSkipped rows: {len(s['skipped'])}, e.g. {escape_md(s['skipped'][0])}"
    if s["status"] == "done":
        try:   # `train` fitted T at the end of the run
            cfg = json.loads((Path(s["out"]) / "config.json").read_text())
        except (OSError, ValueError):   # removed or rewritten since: this line is redrawn every second
            line += f"\n\n`{s['out']}` is no longer there."
        else:
            line += (f"\n\nSaved to `{s['out']}`; it is now selectable in **Ask & compare**.\n\nConfidence "
                     f"temperature: {describe(cfg)}, {escape_md(cfg.get('temperature_source', 'none'))}.")
    if s["status"] == "cancelled":
        line += "\n\nCancelled: nothing was written."
    if s.get("error"):
        line += f"\n\n⚠️ {escape_md(s['error'])}"
    return line


# the switches each model has here: the tab fine-tunes (`train`), so CMDPI offers its fine-tuning terms only
ABLATIONS = {"baseline": (), "cmi-mtl": CMI_ABLATIONS, "cmdpi": STAGE_ABLATIONS["finetune"]}


def _ablations(model: str):
    """Only the chosen model's switches (none for the baseline)."""
    return gr.update(choices=list(ABLATIONS.get(model, ())), value=[], visible=bool(ABLATIONS.get(model)))


def _plot(s: dict):
    """The run's curves; hidden until there is a point to draw."""
    import pandas as pd

    rows = [{"epoch": h["epoch"], "value": h[k], "series": k} for h in s.get("history", [])
            for k in ("train_loss", "val_overall") if h.get(k) is not None]
    return gr.update(visible=bool(rows), value=pd.DataFrame(rows) if rows else None)


def build_tab():
    with gr.Tab("Fine-tune"):
        gr.Markdown("Train a model on a built-in dataset (when its folder is here) or on your own cases: a zip "
                    "of `cases.csv` (image,question,answer[,split]) with its images. Runs in the background; "
                    f"on CPU at most {MAX_CPU_EPOCHS} epochs. The result appears in Ask & compare.")
        with gr.Row():
            model = gr.Dropdown(list(MODELS), value="baseline", label="Model")
            source = gr.Dropdown(sources(), value=sources()[0], label="Data")
            upload = gr.File(label="Cases zip", file_types=[".zip"], type="filepath")
            preset = gr.Dropdown(list(PRESETS), value="offline", label="Preset")
        with gr.Row():
            epochs = gr.Slider(1, MAX_CPU_EPOCHS, value=3, step=1, label="Epochs")
            lr = gr.Number(value=2e-4, label="Learning rate")
            ablate = gr.CheckboxGroup([], label="Ablations (switch off)", visible=False)   # the baseline has none
            tune = gr.Slider(0, MAX_TUNE_BLOCKS, value=0, step=1,
                             label="Image-backbone blocks to train (top K; 0: frozen)")
        estimate = gr.Markdown()
        with gr.Row():
            go = gr.Button("Start", variant="primary")
            stop = gr.Button("Cancel", variant="stop")
        info = gr.Markdown()
        plot = gr.LinePlot(x="epoch", y="value", color="series", title="loss and validation accuracy", height=300,
                           visible=False)
        timer = gr.Timer(1.0)

        def on_estimate(model, source, preset, epochs):
            sec = estimate_seconds(model, source, preset, epochs)
            return ("Estimated time: unknown for this combination." if sec is None
                    else f"Estimated time on this machine: about **{sec / 60:.0f} min** ({sec:.0f} s).")

        model.change(_ablations, [model], ablate, api_visibility="private")
        for c in (model, source, preset, epochs):
            c.change(on_estimate, [model, source, preset, epochs], estimate, api_visibility="private")

        def on_start(*args):
            try:
                start(*args)
            except (ValueError, OSError) as e:
                raise gr.Error(str(e)) from None
            return _status_markdown(status())

        go.click(on_start, [model, source, upload, preset, epochs, lr, ablate, tune], info, api_visibility="private")
        stop.click(lambda: JOB.cancel.set() or "Cancelling after the current step…", None, info,
                   api_visibility="private")
        timer.tick(lambda: (_status_markdown(status()), _plot(status())), None, [info, plot], api_visibility="private")
        gr.api(finetune_api, api_name="finetune")
        gr.api(finetune_status_api, api_name="finetune_status")
        gr.api(finetune_cancel_api, api_name="finetune_cancel")


def finetune_api(model: str, source: str, upload: FileData, preset: str, epochs: int, lr: float,
                 ablate: list[str], tune_image_blocks: int = 0) -> str:
    """Start a background run (training the image backbone's top `tune_image_blocks` blocks);
    returns its checkpoint name."""
    path = api_file(upload, "cases zip") if upload is not None else None
    try:
        return start(model, source, path, preset, epochs, lr, ablate or [], tune_image_blocks)
    except (ValueError, OSError) as e:
        raise gr.Error(str(e)) from None


def finetune_status_api() -> dict:
    s = status()
    return {k: s.get(k) for k in ("status", "name", "out", "step", "total", "error", "seconds")} | {
        "epochs_done": len(s.get("history", []))}


def finetune_cancel_api() -> str:
    JOB.cancel.set()
    return "cancelling"
