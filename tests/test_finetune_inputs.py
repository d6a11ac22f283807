"""The Fine-tune tab's bad inputs: each one a specific message, never a dead server (argparse's SystemExit), a
silent TypeError or an internal error; and a temperature fitted on too few questions is not applied."""
import csv
import json
import re
import zipfile
from pathlib import Path

import gradio as gr
import pytest
import torch

from medvqa.app import finetune
from medvqa.calibration import MIN_FIT_QUESTIONS, fit_report, kept_at_one
from tests.helpers import make_cases_csv

GOOD = ("baseline", "uploaded zip", None, "tiny", 1, 1e-3, [], 0)   # the upload filled in by `_start`


@pytest.fixture(autouse=True)
def user_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_DATA", str(tmp_path / "user"))
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))


def _zip(tmp_path, rows=None, n=16, name="cases"):
    """A cases zip: make_cases_csv's n cases, or its images with `rows` (header first) as cases.csv."""
    folder = tmp_path / name
    make_cases_csv(folder, n)
    if rows is not None:
        with open(folder / "cases.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    z = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in folder.iterdir():
            zf.write(p, p.name)
    return str(z)


def _start(zip_path, **kw):
    args = dict(zip(("model", "source", "upload", "preset", "epochs", "lr", "ablate", "tune_image_blocks"), GOOD))
    return finetune.start(**(args | {"upload": zip_path} | kw))


def _finish():
    finetune.JOB.thread.join(timeout=120)
    return finetune.status()


@pytest.mark.parametrize("kw, message", [
    ({"model": "bogus"}, "unknown model 'bogus': choose one of baseline, cmi-mtl, cmdpi"),
    ({"model": None}, "unknown model None"),
    ({"preset": "bogus-preset"}, "unknown preset 'bogus-preset': choose one of offline, tiny"),
    ({"source": None}, "unknown data source None"),
    ({"lr": None}, "give a learning rate"),
    ({"lr": "fast"}, "'fast' is not a learning rate"),
    ({"lr": 1e10}, r"learning rate 1e\+10: use a value in \(0, 1\]"),
    ({"lr": 0}, "learning rate 0: use a value in"),
    ({"lr": float("nan")}, "learning rate nan"),
    ({"epochs": None}, "give a number of epochs"),
    ({"epochs": 2.5}, "number of epochs 2.5: use a whole number"),
    ({"epochs": 0}, "number of epochs 0"),
    ({"tune_image_blocks": 5}, "image-backbone blocks to train 5: use 0 to 2"),
    ({"ablate": 5}, "has the ablations"),
    ({"ablate": ["nope"]}, "has the ablations"),
])
def test_bad_settings_are_refused_before_the_run(tmp_path, kw, message):
    """argparse exited (SystemExit: the server stopped answering) on an unknown model or preset; float(None) from
    an emptied box was a TypeError nobody caught; lr = 1e10 overflowed mid-run."""
    with pytest.raises(ValueError, match=message):
        _start(_zip(tmp_path), **kw)
    assert finetune.JOB.thread is None or not finetune.JOB.busy()


def test_the_api_answers_a_bad_preset_with_a_message():
    """The probe's call, which took port 7860 down."""
    with pytest.raises(gr.Error, match="unknown preset 'bogus-preset'"):
        finetune.finetune_api("baseline", "vqa-rad", None, "bogus-preset", 1, 1e-3, [], 0)


def test_an_argparse_exit_becomes_a_message(tmp_path, monkeypatch):
    """Whatever the checks let through, parsing's SystemExit never escapes the handler."""
    monkeypatch.setattr(finetune, "PRESETS", ("offline", "tiny", "bogus"))
    with pytest.raises(ValueError, match="the settings were refused: argument --preset: invalid choice: 'bogus'"):
        _start(_zip(tmp_path), preset="bogus")


HEADER = ["image", "question", "answer"]


@pytest.mark.parametrize("rows, message", [
    ([HEADER], "no usable training cases: the CSV has no rows"),
    ([], "no usable training cases: the CSV has no rows"),
    ([HEADER] + [[f"gone{i}.png", "Is there a fracture?", "yes"] for i in range(3)],
     "no usable training cases: 3 rows skipped, e.g. cases.csv record 0: image gone0.png not found"),
    ([HEADER] + [["img0.png", "Is there a fracture?", ""]] * 3,
     "no usable training cases: 3 rows skipped, e.g. cases.csv record 0: empty answer"),
    ([HEADER, ["img0.png", "Is there a fracture?", "yes"]], r"too few usable training cases \(1\): give at least 2"),
    ([HEADER + ["split"]] + [["img0.png", "Is there a fracture?", "yes", "test"]] * 3,
     "no train split to train on \\(the data has test\\)"),
])
def test_cases_with_nothing_to_train_on_say_why(tmp_path, rows, message):
    """These failed in the background as "TypeError: object of type 'NoneType' has no len()" or "KeyError: 'train'"."""
    with pytest.raises(ValueError, match=message):
        _start(_zip(tmp_path, rows))


def test_a_run_shows_its_skipped_rows_and_a_t_kept_at_one(tmp_path):
    """A 16-case run holds out 2 questions: too few to fit T on, so T = 1 and the status says why; the row
    whose image is missing is named."""
    rows = list(csv.reader(open(Path(_zip(tmp_path, name="src")).with_suffix("") / "cases.csv")))
    _start(_zip(tmp_path, rows + [["gone.png", "Is there a fracture?", "yes"]]))
    s = _finish()
    assert s["status"] == "done", s
    md = finetune._status_markdown(s)
    assert "Skipped rows: 1, e.g. cases\\.csv record 16: image gone\\.png not found" in md
    cfg = json.loads((Path(s["out"]) / "config.json").read_text())
    assert cfg["temperature"] == 1.0 and cfg["temperature_fit"]["n"] == 2 and "rejected" in cfg["temperature_fit"]
    assert "Confidence temperature: T = 1, " in md and "too few" in md


def test_a_user_error_in_the_run_reads_as_a_plain_message(tmp_path, monkeypatch):
    """Past the checks (bypassed here), the trainer refuses an empty training set with a DataError, shown
    without its type as a user's mistake is; it was "TypeError: object of type 'NoneType' has no len()"."""
    monkeypatch.setattr(finetune, "_check_cases", lambda *a: [])
    _start(_zip(tmp_path, [HEADER]))
    s = _finish()
    assert s["status"] == "failed" and s["error"].startswith("no usable training cases: the training split is empty")


def test_fit_refuses_an_empty_training_set(tmp_path):
    from medvqa.config import get_preset
    from medvqa.data import DataError
    from medvqa.train.trainer import fit

    with pytest.raises(DataError, match="no usable training cases"):
        fit(torch.nn.Linear(2, 2), None, None, get_preset("tiny").train, tmp_path, {})


def _calibrated(n, seed=0):
    """n questions whose labels are drawn from softmax(z), answered with 4 z: T = 4 undoes it."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, 6, generator=g)
    return 4 * z, torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)


def test_a_temperature_fitted_on_too_few_questions_is_not_applied():
    """A 12-case fine-tune fitted T = 2.02e+06 on its one held-out question, and applied it."""
    logits, labels = _calibrated(4000)
    one = fit_report(logits[:1], labels[:1], "unit")
    assert one["temperature"] == 1.0 and one["temperature_fit"]["rejected"]["temperature"] != 1.0
    assert "1 questions are too few to fit T on (at least 30), so T = 1 is used" in one["temperature_source"]
    assert not kept_at_one(one)   # not the ECE gate's reason (the About tab names that one)
    few = fit_report(logits[:MIN_FIT_QUESTIONS - 1], labels[:MIN_FIT_QUESTIONS - 1], "unit")
    assert few["temperature"] == 1.0 and "rejected" in few["temperature_fit"]
    assert fit_report(logits, labels, "unit")["temperature"] == pytest.approx(4.0, rel=0.1)
    # two Ts: each needs its own questions; one T on all of them may still pass
    pair = fit_report(logits, labels, "unit", yes_no=torch.arange(4000) < 10)
    assert pair["temperature"] == 1.0 and "temperature_yes_no" not in pair
    assert "10 questions are too few" in pair["temperature_source"] and "without --yes-no" in pair["temperature_source"]
    # none with its answer in the vocabulary (train --vocab train): T = 1 said plainly, the run not stopped
    none = fit_report(logits[:50], torch.full((50,), -1), "unit")
    assert none == {"temperature": 1.0, "temperature_source": "unit; no held-out question has its answer in the "
                                                              "model's vocabulary, so T = 1 is used"}
    half = fit_report(logits, torch.where(torch.arange(4000) < 10, -1, labels), "unit", yes_no=torch.arange(4000) < 10)
    assert half["temperature"] == 1.0 and "of one kind" in half["temperature_source"] and "may fit" in half["temperature_source"]


def test_no_shipped_temperature_was_fitted_on_too_few_questions():
    """The minimum changes no shipped T: each was fitted (or, transferred, its source was) on hundreds."""
    for cfg in sorted((Path(__file__).parents[1] / "assets" / "checkpoints").glob("*/config.json")):
        c = json.loads(cfg.read_text())
        n = c["temperature_fit"]["n"] if "temperature_fit" in c else int(re.search(r"(\d+) questions",
                                                                                     c["temperature_source"])[1])
        assert n >= 10 * MIN_FIT_QUESTIONS, cfg.parent.name
