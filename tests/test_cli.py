import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medvqa.cli import main
from medvqa.predict import checkpoints_dir
from tests.conftest import data_root
from tests.helpers import tiny_checkpoint


def run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.data
def test_data_stats_vqa_rad(capsys):
    rc, out, err = run(capsys, "data", "stats", "--dataset", "vqa-rad", "--root", str(data_root("vqa_rad")), "--json")
    s = json.loads(out)
    assert rc == 0
    assert s["splits"]["train"]["n"] == 3064 and s["splits"]["test"]["n"] == 451
    assert (s["splits"]["test"]["n_closed"], s["splits"]["test"]["n_open"]) == (272, 179)
    assert s["vocab"] == {"all": 498, "train": 461}                     # M3AE's 498 classes
    assert s["oov_under_train_vocab"]["test"] == {"n": 44, "open": 38}


@pytest.mark.data
def test_data_stats_slake(capsys):
    rc, out, err = run(capsys, "data", "stats", "--dataset", "slake", "--root", str(data_root("slake")), "--json")
    s = json.loads(out)["splits"]
    assert [s[k]["n"] for k in ("train", "validate", "test")] == [4919, 1053, 1061]
    assert [s[k]["n_images"] for k in ("train", "validate", "test")] == [450, 96, 96]
    assert s["train"]["skipped"] == 1 and "record 1622: empty answer" in err      # reported, not dropped silently


@pytest.mark.data
def test_eval_predictions_file(capsys, tmp_path):
    root = data_root("vqa_rad")
    test = json.loads((root / "testset.json").read_text())
    preds = {str(r["qid"]): ("yes" if r["answer_type"].strip() == "CLOSED" else r["answer"]) for r in test}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "p.json"), "--dataset", "vqa-rad",
                       "--root", str(root), "--json")
    r = json.loads(out)
    assert rc == 0 and r["open"] == 100.0 and r["n"] == 451 and r["vocab"] == 498 and r["oov"] == 0
    n_yes = sum(t["answer"].strip().lower() == "yes" for t in test if t["answer_type"].strip() == "CLOSED")
    assert r["closed"] == pytest.approx(100 * n_yes / 272, abs=0.01)
    qid = next(iter(preds))
    for score in ("abc", 2.5, -1, None):
        (tmp_path / "s.json").write_text(json.dumps({qid: {"answer": "yes", "score": score}}))
        rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "s.json"), "--dataset", "vqa-rad",
                           "--root", str(root), "--json")
        assert rc == 2 and "not a probability in [0, 1]" in err, err
    (tmp_path / "one.json").write_text(json.dumps({qid: {"answer": "yes", "score": 0.5}}))
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "one.json"), "--dataset", "vqa-rad",
                       "--root", str(root), "--json")
    assert rc == 0 and "answers 1 of 451 questions" in err and json.loads(out)["missing_predictions"] == 450


def test_bad_input_one_line_exit_2(capsys, tmp_path):
    rc, out, err = run(capsys, "data", "stats", "--dataset", "slake", "--root", str(tmp_path / "nope"))
    assert rc == 2 and err.strip().count("\n") == 0 and "root not found" in err and "Traceback" not in err
    (tmp_path / "p.json").write_text("{not json")
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "p.json"), "--dataset", "folder", "--root", str(tmp_path))
    assert rc == 2 and "error:" in err
    rc, out, err = run(capsys, "train", "--model", "baseline", "--dataset", "folder", "--root", str(tmp_path),
                       "--out", str(tmp_path / "ck"), "--image-views", "-1")
    assert rc == 2 and "--image-views -1" in err and err.strip().count("\n") == 0
    rc, out, err = run(capsys, "train", "--model", "baseline", "--dataset", "folder", "--root", str(tmp_path),
                       "--out", str(tmp_path / "ck"), "--ablate", "cmcl")
    assert rc == 2 and "no parts to switch off" in err and err.strip().count("\n") == 0
    for cmd, term in (("train", "global"), ("pretrain", "mixup")):   # CMDPI's other stage's term would be ignored
        rc, out, err = run(capsys, cmd, "--model", "cmdpi", "--preset", "tiny", "--dataset", "folder", "--root",
                           str(tmp_path), "--out", str(tmp_path / "ck"), "--ablate", term)
        stage = "finetune" if cmd == "train" else "pretrain"
        assert rc == 2 and f"not a part of cmdpi's {stage}" in err and err.strip().count("\n") == 0, err
    for model, flag, bad in (("cmi-mtl", "--queries", "0"), ("cmdpi", "--image-pool", "5"), ("cmi-mtl", "--dropout", "1.5"),
                             ("baseline", "--weight-decay", "-1"), ("baseline", "--ema", "1"),
                             ("baseline", "--val-fraction", "1"), ("cmdpi", "--lam", "gauss"),
                             ("baseline", "--epochs", "0")):
        rc, out, err = run(capsys, "train", "--model", model, "--preset", "tiny", "--dataset", "folder",
                           "--root", str(tmp_path), "--out", str(tmp_path / "ck"), flag, bad)
        assert rc == 2 and f"{flag} {bad}" in err and err.strip().count("\n") == 0


def test_predict_cli_and_errors(capsys, tmp_path):
    ck = tiny_checkpoint(tmp_path)
    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    rc, out, err = run(capsys, "predict", "--checkpoint", str(ck), "--image", str(tmp_path / "a.png"),
                       "--question", "Is this normal?", "--json")
    d = json.loads(out)
    assert rc == 0 and {"answer", "score", "top_k", "free_text"} <= set(d) and len(d["top_k"]) == 4  # tiny vocabulary: 4 answers
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rc, out, err = run(capsys, "predict", "--checkpoint", str(ck), "--image", str(tmp_path / "bad.png"), "--question", "Is it?")
    assert rc == 2 and "bad.png" in err and "not a readable image" in err
    rc, out, err = run(capsys, "predict", "--checkpoint", str(ck), "--image", str(tmp_path / "a.png"), "--question", "")
    assert rc == 2 and "empty" in err
    # batch CSV: a bad row is reported and kept, the rest answered
    (tmp_path / "cases.csv").write_text("image,question,answer\na.png,Is it normal?,yes\nbad.png,Is it?,no\n")
    rc, out, err = run(capsys, "predict", "--checkpoint", str(ck), "--csv", str(tmp_path / "cases.csv"),
                       "--out", str(tmp_path / "answers.csv"))
    rows = (tmp_path / "answers.csv").read_text().splitlines()
    assert rc == 0 and len(rows) == 3 and "row 2" in err
    # an empty question is one row's error, rows keep their order, cells past the header are left out
    (tmp_path / "cases.csv").write_text("image,question,answer\nbad.png,Is it?,no\na.png,,yes\n"
                                        "a.png,Is it normal?,yes,extra,cells\n")
    rc, out, err = run(capsys, "predict", "--checkpoint", str(ck), "--csv", str(tmp_path / "cases.csv"),
                       "--out", str(tmp_path / "answers.csv"))
    import csv
    got = list(csv.DictReader(open(tmp_path / "answers.csv")))
    assert rc == 0 and [r["image"] for r in got] == ["bad.png", "a.png", "a.png"]
    assert "not a readable image" in got[0]["error"] and got[1]["error"] == "the question is empty"
    assert got[2]["prediction"] and got[2]["error"] == "" and "" not in got[0] and "cells past the header" in err
    (tmp_path / "latin.csv").write_bytes("image,question\na.png,Qu\xe9?\n".encode("latin-1"))
    rc, out, err = run(capsys, "predict", "--checkpoint", str(ck), "--csv", str(tmp_path / "latin.csv"),
                       "--out", str(tmp_path / "answers2.csv"))
    assert rc == 2 and "not a readable CSV" in err and err.count("\n") == 1


def test_module_entry_point_json_only():
    r = subprocess.run([sys.executable, "-m", "medvqa", "data", "stats", "--dataset", "vqa-rad", "--root", "/nonexistent"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error:")


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.json")))
def test_every_sweep_config_parses(config):
    """A typo in a variant would otherwise surface an hour into a sweep."""
    from medvqa.cli import build_parser
    from medvqa.cli.train import variant_stages

    cfg = json.loads((Path(__file__).parents[1] / "configs" / config).read_text())
    data = ["--dataset", cfg["dataset"], "--root", cfg["root"], "--out", "x"]
    for spec in cfg["variants"].values():
        for stage, args in variant_stages(spec).items():
            build_parser().parse_args([stage, *data, *cfg.get("common", []), *args])


def test_cancel_after_the_last_step_writes_no_checkpoint(tmp_path):
    """The app's cancel can arrive while `train` evaluates after its last step: nothing is written."""
    from medvqa.cli import build_parser
    from medvqa.cli.common import parse
    from medvqa.train.trainer import Callbacks
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 16)
    a = parse(build_parser(), ["train", "--model", "baseline", "--preset", "tiny", "--dataset", "folder",
                                   "--root", str(tmp_path / "data"), "--out", str(tmp_path / "ck"),
                                   "--workdir", str(tmp_path / "run"), "--epochs", "1", "--json"])
    epochs = []
    a.callbacks = Callbacks(on_epoch=lambda e, m: epochs.append(e), should_stop=lambda: bool(epochs))
    assert a.func(a) == 130 and epochs == [1] and not (tmp_path / "ck").exists()


def test_dropout_weight_decay_and_ema_flags_reach_the_checkpoint_config(tmp_path, capsys):
    import json

    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 16)
    for model, key in (("cmi-mtl", "cmi_mtl"), ("baseline", "baseline")):
        ck = tmp_path / model
        rc, out, err = run(capsys, "train", "--model", model, "--preset", "tiny", "--dataset", "folder",
                           "--root", str(tmp_path / "data"), "--out", str(ck), "--workdir", str(tmp_path / f"run-{model}"),
                           "--epochs", "1", "--dropout", "0.25", "--weight-decay", "0.05", "--ema", "0.99", "--json")
        preset = json.loads((ck / "config.json").read_text())["preset"]
        assert rc == 0 and preset[key]["dropout"] == 0.25 and preset["train"]["weight_decay"] == 0.05
        assert preset["train"]["ema"] == 0.99


def test_val_fraction_zero_trains_on_all_of_train_and_keeps_the_last_epoch(tmp_path, capsys):
    """A refit on every training question: nothing is held out, and the last epoch is saved."""
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 16)
    args = ["train", "--model", "baseline", "--preset", "tiny", "--dataset", "folder", "--root", str(tmp_path / "data"),
            "--epochs", "3", "--json"]
    rc, out, err = run(capsys, *args, "--out", str(tmp_path / "all"), "--workdir", str(tmp_path / "r0"), "--val-fraction", "0")
    m = json.loads(out)
    assert rc == 0 and m["best_epoch"] == 3 and m["val_overall"] is None
    assert m["selected_on"] == "none: all of train, the last epoch of a fixed schedule"
    lines = (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("val_overall" not in json.loads(x) for x in lines)
    rc, out, err = run(capsys, *args, "--out", str(tmp_path / "held"), "--workdir", str(tmp_path / "r1"), "--val-fraction", "0.25")
    assert rc == 0 and json.loads(out)["selected_on"] == "a held-out 25% of train questions (seed 0)"


def test_removed_options_load_at_their_default_and_are_refused_otherwise(tmp_path, capsys):
    """Checkpoints written before an option was removed carry it at its default; any other value is
    a model this code cannot rebuild: one line, exit 2, never a silently different model."""
    ck = tiny_checkpoint(tmp_path)
    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    cfg = json.loads((ck / "config.json").read_text())
    ask = ["predict", "--checkpoint", str(ck), "--image", str(tmp_path / "a.png"), "--question", "Is it?", "--json"]
    for section, key, value, rc_want in (("cmi_mtl", "head_input", "concat", 0), ("train", "word_drop", 0.0, 0),
                                         ("cmi_mtl", "head_input", "product", 2), ("train", "word_drop", 0.2, 2),
                                         ("cmi_mtl", "no_such_option", 1, 2)):
        changed = json.loads(json.dumps(cfg))
        changed["preset"][section][key] = value
        (ck / "config.json").write_text(json.dumps(changed))
        from medvqa.predict import Predictor

        Predictor._cache.clear()
        rc, out, err = run(capsys, *ask)
        assert rc == rc_want, (key, value, err)
        if rc_want:
            assert f"{section}.{key}" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "assets" / "checkpoints").iterdir()))
def test_every_shipped_checkpoint_config_loads(name):
    from medvqa.train.checkpoint import read_config

    read_config(Path(__file__).parents[1] / "assets" / "checkpoints" / name)


def test_eval_against_a_second_model_is_a_paired_test(capsys, tmp_path):
    """`eval --against` compares two answer sets on the same questions; a missing model is one line."""
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 8)                     # answers: yes yes no liver yes no no "left lung"
    right = {"0": "yes", "1": "yes", "2": "no", "3": "liver", "4": "yes", "5": "no", "6": "no", "7": "left lung"}
    (tmp_path / "a.json").write_text(json.dumps(right))
    (tmp_path / "b.json").write_text(json.dumps(right | {"3": "spleen", "7": "right lung"}))
    args = ["eval", "--predictions", str(tmp_path / "a.json"), "--dataset", "folder", "--root", str(tmp_path / "data")]
    rc, out, err = run(capsys, *args, "--against", str(tmp_path / "b.json"), "--json")
    r = json.loads(out)
    assert rc == 0 and r["overall"] == 100.0 and r["overall_ci95"][1] == 100.0
    c = r["against"]
    assert (c["a"], c["b"], c["difference"], c["only_a_right"], c["only_b_right"]) == (100.0, 75.0, 25.0, 2, 0)
    assert c["mcnemar_p"] == 0.5                                # 2 against 0 could be chance
    rc, out, err = run(capsys, *args, "--against", str(tmp_path / "b.json"))
    assert rc == 0 and "+25.00 points" in out and "McNemar exact p = 0.5" in out
    rc, out, err = run(capsys, *args, "--against", str(tmp_path / "no-such-model"))
    assert rc == 2 and err.startswith("error:") and err.strip().count("\n") == 0


def test_eval_swap_images_scores_the_same_questions_with_other_images(capsys, tmp_path):
    """`--swap-images` answers each question again with another image: the result sits beside the
    normal one and counts how many answers moved; a predictions file cannot do it (one line)."""
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 8)
    ck = tiny_checkpoint(tmp_path / "ck")
    args = ["eval", "--checkpoint", str(ck), "--dataset", "folder", "--root", str(tmp_path / "data"), "--split", "train"]
    rc, out, err = run(capsys, *args, "--swap-images", "--json")
    r = json.loads(out)
    b = r["swapped_images"]
    assert rc == 0 and set(b) == {"open", "closed", "overall", "by_organ", "by_question_type", "answers_changed"}
    assert 0 <= b["answers_changed"] <= 100 and 0 <= b["overall"] <= 100
    rc, plain, err = run(capsys, *args, "--json")
    assert "swapped_images" not in json.loads(plain) and json.loads(plain)["overall"] == r["overall"]
    rc, out, err = run(capsys, *args, "--swap-images")
    assert rc == 0 and "with another question's image: open" in out and "% of answers changed" in out
    (tmp_path / "p.json").write_text("{}")
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "p.json"), "--dataset", "folder",
                       "--root", str(tmp_path / "data"), "--split", "train", "--swap-images")
    assert rc == 2 and "--swap-images needs --checkpoint" in err and err.strip().count("\n") == 0


def test_by_seen_needs_a_separate_train_split(capsys, tmp_path):
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 4)   # a folder CSV without a split column is one training split
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "p.json"), "--dataset", "folder",
                       "--root", str(tmp_path / "data"), "--by", "seen")
    assert rc == 2 and "needs separate 'train' and 'test' splits" in err and err.strip().count("\n") == 0
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "p.json"), "--dataset", "folder",
                       "--root", str(tmp_path / "data"), "--split", "train", "--by", "seen")
    assert rc == 2 and "give --split test" in err


def test_a_bad_against_fails_before_the_model_answers(capsys, tmp_path, monkeypatch):
    """A bad `--against` is one line at once, not after the main model has answered the split."""
    from medvqa.predict import Predictor
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 8)
    ck = tiny_checkpoint(tmp_path / "ck")
    monkeypatch.setattr(Predictor, "predict_records", lambda *a, **k: pytest.fail("answered before --against was read"))
    (tmp_path / "bad.json").write_text("{not json")
    for bad in ("bad.json", "no-such-model"):
        rc, out, err = run(capsys, "eval", "--checkpoint", str(ck), "--dataset", "folder", "--root", str(tmp_path / "data"),
                           "--against", str(tmp_path / bad))
        assert rc == 2 and err.startswith("error:") and err.strip().count("\n") == 0, err


def test_a_model_flag_given_to_another_model_is_refused(capsys, tmp_path):
    """Each model's flags are its own: given to another model they are refused in one line, before any data is read."""
    base = ["--preset", "tiny", "--dataset", "folder", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "ck")]
    for model, flag, value, owner in (("baseline", "--queries", "64", "CMI-MTL"), ("cmdpi", "--alpha", "0.5", "CMI-MTL"),
                                      ("cmi-mtl", "--image-pool", "2", "CMDPI"), ("baseline", "--lam", "uniform", "CMDPI"),
                                      ("cmi-mtl", "--init", str(tmp_path), "CMDPI")):
        rc, out, err = run(capsys, "train", "--model", model, *base, flag, value)
        assert rc == 2 and err == f"error: {flag} is a {owner} option: --model {model} does not take it\n"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    cmi = help_text.split("CMI-MTL options (--model cmi-mtl):")[1].split("\n\n")[0]
    cmdpi = help_text.split("CMDPI options (--model cmdpi):")[1].split("\n\n")[0]
    assert "--queries" in cmi and "--alpha" in cmi and "--image-pool" not in cmi
    assert "--image-pool" in cmdpi and "--init" in cmdpi and "--queries" not in cmdpi


def test_flags_set_the_config_fields_they_name(tmp_path):
    """Overrides come from the config dataclasses: each given flag sets its field, the rest keep the preset's."""
    from medvqa.cli import build_parser
    from medvqa.cli.options import apply_options
    from medvqa.config import get_preset

    data = ["--dataset", "folder", "--root", str(tmp_path), "--out", "x"]
    a = build_parser().parse_args(["train", "--model", "cmi-mtl", *data, "--queries", "16", "--qqformer-text", "off",
                                   "--dropout", "0.3", "--epochs", "5", "--alpha", "0.4"])
    p = get_preset("offline")
    apply_options(a, p)
    assert (p.cmi_mtl.n_queries, p.cmi_mtl.qqformer_text, p.cmi_mtl.dropout, p.cmi_mtl.alpha) == (16, False, 0.3, 0.4)
    assert p.train.epochs == 5 and p.train.lr == get_preset("offline").train.lr and p.cmdpi.alpha == 0.5
    # pretrain: CMDPI's inter-modal weight is --inter-weight; --alpha (CMI-MTL's L_vtc weight) is not a pretrain flag
    a = build_parser().parse_args(["pretrain", "--model", "cmdpi", *data, "--inter-weight", "0.7"])
    p = get_preset("offline")
    apply_options(a, p)
    assert p.cmdpi.alpha == 0.7 and p.cmi_mtl.alpha == get_preset("offline").cmi_mtl.alpha
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["pretrain", "--model", "cmdpi", *data, "--alpha", "0.7"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):   # a fine-tuning weight is no pretraining flag, and the other way round
        build_parser().parse_args(["pretrain", "--model", "cmdpi", *data, "--mix-weight", "2"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--model", "cmdpi", *data, "--inter-weight", "2"])


def test_train_reports_the_test_split_only_when_asked(tmp_path, capsys):
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 16, n_test=4)
    args = ["train", "--model", "baseline", "--preset", "tiny", "--dataset", "folder", "--root", str(tmp_path / "data"),
            "--epochs", "1"]
    rc, out, err = run(capsys, *args, "--out", str(tmp_path / "a"), "--workdir", str(tmp_path / "ra"))
    assert rc == 0 and "test:" not in out and "saved" in out
    assert "test" not in json.loads((tmp_path / "a" / "metrics.json").read_text())
    rc, out, err = run(capsys, *args, "--out", str(tmp_path / "b"), "--workdir", str(tmp_path / "rb"), "--report-test")
    assert rc == 0 and "test: open" in out
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["test"]["n"] == 4


def test_sweep_config_errors_are_one_line_and_missing_test_metrics_read_as_a_dash(tmp_path, capsys):
    cfg = tmp_path / "sweep.json"
    for bad, says in (({"dataset": "folder", "root": "r"}, "no variants"), ({"root": "r", "variants": {"a": []}}, "no dataset"),
                      ({"dataset": "folder", "root": "r", "variants": {}}, "non-empty"),
                      ({"dataset": "folder", "root": "r", "variants": {"a": "--model baseline"}}, "variant 'a'"),
                      ([1, 2], "expected a JSON object")):
        cfg.write_text(json.dumps(bad))
        rc, out, err = run(capsys, "sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"))
        assert rc == 2 and says in err and err.strip().count("\n") == 0, err
    # a variant already trained, without test metrics (no --report-test, or no test split): reused, shown as –
    cfg.write_text(json.dumps({"dataset": "folder", "root": str(tmp_path), "variants": {"Base line": ["--model", "baseline"]}}))
    ck = tmp_path / "sw" / "checkpoints" / "base-line"
    ck.mkdir(parents=True)
    (ck / "metrics.json").write_text(json.dumps({"val_overall": None, "best_epoch": 3, "train_seconds": 12.3}))
    rc, out, err = run(capsys, "sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"))
    assert rc == 0 and "| Base line | – | – | – | – | 3 | 12 |" in out


def test_internal_errors_exit_1_and_user_errors_exit_2(tmp_path, capsys, monkeypatch):
    """Only the user's input exits 2; a fault of ours (any ValueError too) exits 1 in one line, and
    MEDVQA_DEBUG=1 shows its traceback."""
    from medvqa.cli import analysis

    def fails_with(e):
        def cmd(a):
            raise e
        return cmd

    monkeypatch.setattr(analysis, "cmd_bench", fails_with(ValueError("shapes do not match\nsecond line")))
    rc, out, err = run(capsys, "bench")
    assert rc == 1 and err.startswith("error: ValueError: shapes do not match") and err.count("\n") == 1
    monkeypatch.setattr(analysis, "cmd_bench", fails_with(FileNotFoundError(2, "No such file", "/tmp/ours")))
    assert run(capsys, "bench")[0] == 1                                  # not a path the user gave
    given = tmp_path / "b.json"
    monkeypatch.setattr(analysis, "cmd_bench", fails_with(FileNotFoundError(2, "No such file", str(given))))
    assert run(capsys, "bench", "--out", str(given))[0] == 2             # the user's --out
    from medvqa.train.checkpoint import CheckpointError
    monkeypatch.setattr(analysis, "cmd_bench", fails_with(CheckpointError("weights do not fit (Missing key(s):\n\t\"a\")")))
    rc, out, err = run(capsys, "bench")
    assert rc == 2 and err == 'error: weights do not fit (Missing key(s): "a")\n'   # a user error, one line too
    monkeypatch.setenv("MEDVQA_DEBUG", "1")
    monkeypatch.setattr(analysis, "cmd_bench", fails_with(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        main(["bench"])
    monkeypatch.delenv("MEDVQA_DEBUG")
    ck = tiny_checkpoint(tmp_path)                                        # the user's bad inputs, from the library
    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    for args, says in ((["predict", "--checkpoint", str(tmp_path / "none"), "--image", "a.png", "--question", "q"],
                        "no such checkpoint"),
                       (["explain", "--checkpoint", str(ck), "--image", str(tmp_path / "a.png"), "--question", "Is it?",
                         "--layer", "99", "--out", str(tmp_path / "m.png")], "layer 99")):
        rc, out, err = run(capsys, *args)
        assert rc == 2 and says in err and err.strip().count("\n") == 0, err


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """Inputs a user gets wrong: one line on stderr, exit 2, and nothing of theirs overwritten."""
    import shutil

    for args in (["eval", "--dataset", "slak"],                                      # argparse's own errors
                 ["predict", "--checkpoint", "x", "--image", "a.png", "--question", "q", "--top-k", "0"],
                 ["explain", "--checkpoint", "x", "--image", "a", "--question", "q", "--out", "m.png", "--opacity", "5"],
                 ["explain", "--checkpoint", "x", "--image", "a", "--question", "q", "--out", "m.png", "--colormap", "no"],
                 ["pointing-game", "--checkpoint", "x", "--root", "r", "--limit", "-2"],
                 ["figures", "--checkpoint", "x", "--dataset", "vqa-rad", "--root", "r", "--out", "f", "--cam-cases", "-1"],
                 ["umap", "--checkpoint", "x", "--dataset", "vqa-rad", "--root", "r", "--out", "u.png", "--seed", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    ck = tiny_checkpoint(tmp_path)
    Image.new("RGB", (30, 30)).save(tmp_path / "a.png")
    ask = ["--image", str(tmp_path / "a.png"), "--question", "Is it?"]
    broken = tmp_path / "broken"
    shutil.copytree(ck, broken)
    (broken / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:1000])
    foreign = tmp_path / "foreign"
    shutil.copytree(ck, foreign)
    cfg = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps({**cfg, "model": "foo"}))
    for t in (0, -1, "abc", None):   # 0 showed a wrong answer at score NaN, -1 reversed the ranking
        bad_t = tmp_path / f"bad-t-{t}"
        shutil.copytree(ck, bad_t)
        (bad_t / "config.json").write_text(json.dumps({**cfg, "temperature": t}))
    cases = tmp_path / "cases.csv"
    cases.write_text("image,question\na.png,Is it?\n")
    (tmp_path / "empty.csv").write_text("image,question\n")
    (tmp_path / "note.txt").write_text("keep me")
    (tmp_path / "test-only").mkdir()
    (tmp_path / "test-only" / "cases.csv").write_text("image,question,answer,split\n../a.png,Is it?,yes,test\n")
    for args, says in ((["predict", "--checkpoint", str(broken), *ask], "unreadable"),
                       (["predict", "--checkpoint", str(foreign), *ask], "unknown model 'foo'"),
                       (["predict", "--checkpoint", str(tmp_path / "bad-t-0"), *ask], "temperature 0: use a number above 0"),
                       (["predict", "--checkpoint", str(tmp_path / "bad-t--1"), *ask], "temperature -1"),
                       (["predict", "--checkpoint", str(tmp_path / "bad-t-abc"), *ask], "temperature 'abc'"),
                       (["predict", "--checkpoint", str(tmp_path / "bad-t-None"), *ask], "temperature None"),
                       (["predict", "--checkpoint", str(ck), "--csv", str(cases), "--out", str(cases)], "input CSV"),
                       (["predict", "--checkpoint", str(ck), "--csv", str(cases), "--out", str(tmp_path)], "a folder"),
                       (["predict", "--checkpoint", str(ck), "--csv", str(tmp_path / "empty.csv"), "--out",
                         str(tmp_path / "o.csv")], "no rows"),
                       (["predict", "--checkpoint", str(ck), "--csv", str(cases), "--out", str(tmp_path / "o.csv"),
                         *ask], "not both"),
                       (["predict", "--checkpoint", str(ck), *ask, "--out", str(tmp_path / "o.json")], "--out is for"),
                       (["explain", "--checkpoint", str(ck), *ask, "--out", str(tmp_path / "note.txt" / "m.png")],
                        "note.txt"),
                       (["predict", "--checkpoint", str(ck), "--csv", str(cases), "--out",
                         str(tmp_path / "note.txt" / "o.csv")], "no folder"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(tmp_path / "note.txt" / "ck")], "note.txt"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(tmp_path / "note.txt")], "not a checkpoint folder"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(tmp_path / "o"), "--lr", "-1"], "above 0"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(tmp_path / "o"), "--workdir", str(tmp_path / "o")],
                        "overlaps the work folder"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", "baseline-slake"], "shipped checkpoint"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(checkpoints_dir() / "baseline-slake")], "shipped checkpoints folder"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(tmp_path / "o"), "--lr", "inf"], "finite"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(tmp_path / "o"), "--seed", "-1"], "0 to 2**32 - 1"),

                       (["predict", "--checkpoint", str(cases), *ask], "a file; a checkpoint is a folder"),
                       (["index", "--checkpoint", str(ck), "--dataset", "vqa-rad", "--root", str(tmp_path),
                         "--out", str(tmp_path)], "a folder; give a file name"),
                       (["bench", "--out", str(tmp_path / "note.txt" / "b.json")], "note.txt is a file"),
                       (["umap", "--checkpoint", str(ck), "--dataset", "vqa-rad", "--root", str(tmp_path),
                         "--out", str(tmp_path)], "a folder; give a file name"),
                       (["calibrate", "--checkpoint", str(ck), "--transfer-from", str(ck)], "the checkpoint itself"),
                       (["pointing-game", "--checkpoint", str(ck), "--root", str(tmp_path / "cache")], "not a SLAKE folder"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "vqa-rad", "--root",
                         str(tmp_path), "--out", str(tmp_path / "new" / "ck"), "--ablate", "cmcl"], "no parts"),
                       (["train", "--model", "baseline", "--preset", "tiny", "--dataset", "folder", "--root",
                         str(tmp_path / "test-only"), "--out", str(tmp_path / "new" / "ck")], "no train split")):
        rc, out, err = run(capsys, *args)
        assert rc == 2 and says in err and err.strip().count("\n") == 0, (args, err)
    assert (tmp_path / "note.txt").read_text() == "keep me" and cases.read_text() == "image,question\na.png,Is it?\n"
    assert not (tmp_path / "new").exists()   # a refused command makes no folder, refused by its data too


@pytest.mark.data
def test_eval_refuses_predictions_for_another_split(tmp_path, capsys):
    (tmp_path / "p.json").write_text(json.dumps({"no-such-qid": "yes"}))
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "p.json"), "--dataset", "vqa-rad",
                       "--root", str(data_root("vqa_rad")), "--split", "test")
    assert rc == 2 and "none of its question ids" in err and err.count("\n") == 1, err
    from medvqa.data import load_split

    qid = load_split("vqa-rad", data_root("vqa_rad"), "test").records[0].qid
    (tmp_path / "mine.json").write_text(json.dumps({qid: "yes"}))
    rc, out, err = run(capsys, "eval", "--predictions", str(tmp_path / "mine.json"), "--against", str(tmp_path / "p.json"),
                       "--dataset", "vqa-rad", "--root", str(data_root("vqa_rad")), "--split", "test")
    assert rc == 2 and "p.json: none of its question ids" in err and err.count("\n") == 1, err


def test_the_out_probe_leaves_links_and_pipes_alone(tmp_path):
    """check_writable tries a file --out where it would be written, but never follows a dangling link
    (it had made the link's target and removed the link) nor opens a FIFO (it would block)."""
    import os

    from medvqa.cli.common import check_writable

    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "target.json")
    check_writable(link, file=True)
    assert link.is_symlink() and not (tmp_path / "target.json").exists()
    os.mkfifo(tmp_path / "fifo")
    check_writable(tmp_path / "fifo", file=True)   # returns at once
    check_writable(tmp_path / "new.json", file=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.json"]
