"""Temperature scaling: the fit, its storage in config.json, the Predictor applying it, the CLI, and
how the app shows probabilities (never "100 %", uncertain answers with their runner-up)."""
import json
import shlex

import pytest
import torch
from PIL import Image

from medvqa.calibration import (KEPT_AT_ONE, describe, expected_calibration_error, fit_report, fit_temperature, gate,
                                kept_at_one, nll, percent, probabilities, row_temperatures, top1, write_temperature,
                                yes_no_rows)
from medvqa.cli import main
from tests.helpers import make_cases_csv, tiny_checkpoint


def _overconfident(n=4000, c=6, sharpen=4.0, seed=0):
    """Labels drawn from softmax(z): softmax(z) is calibrated by construction, so a model that
    answers with sharpen * z is overconfident, and T = sharpen undoes it."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, c, generator=g)                                      # (N, C)
    labels = torch.multinomial(z.softmax(-1), 1, generator=g).squeeze(1)          # (N,)
    return sharpen * z, labels


def test_fit_on_an_overconfident_model_lowers_ece_and_keeps_the_argmax():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.1)
    idx1, conf1 = top1(logits)
    idx_t, conf_t = top1(logits, t)
    assert torch.equal(idx1, idx_t)                                               # no answer changes
    ok = (idx1 == labels).numpy()
    before, after = expected_calibration_error(conf1.numpy(), ok), expected_calibration_error(conf_t.numpy(), ok)
    assert before > 20 and after < 3 and after < before / 5
    assert nll(logits, labels, t) < nll(logits, labels)


def test_fit_finds_an_underconfident_model_too_and_skips_unknown_answers():
    logits, labels = _overconfident(sharpen=0.5)
    labels[:100] = -1                                                             # out of vocabulary: left out
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="nothing to fit T on"):
        fit_temperature(logits[:3], torch.full((3,), -1))


def test_a_fitted_t_that_raises_the_ece_on_its_own_questions_is_not_applied():
    """Half the rows 50 logits apart and right 84 % of the time, half 3 apart and right 96 %: the NLL's T (~27)
    fixes the first half but drowns the second in underconfidence, so the ECE on the fit questions rises and
    T = 1 is kept, the rejected T named. A T that lowers the ECE (the overconfident model) is applied."""
    gap = torch.tensor([50.0] * 50 + [3.0] * 50)
    logits = torch.stack([gap, torch.zeros(100)], -1)                            # (N, 2)
    labels = torch.zeros(100, dtype=torch.long)
    labels[:8] = 1
    labels[50:52] = 1
    r = fit_report(logits, labels, "unit")
    fit = r["temperature_fit"]
    assert r["temperature"] == 1.0 and fit["rejected"]["temperature"] > 10
    assert fit["ece_after"] > fit["ece_before"] and fit["nll_after"] < fit["nll_before"]
    assert r["temperature_source"].startswith("unit; its fitted T = ") and "T = 1 is kept" in r["temperature_source"]
    good = fit_report(*_overconfident(), "unit")
    assert good["temperature"] == pytest.approx(4.0, rel=0.1) and "rejected" not in good["temperature_fit"]
    # two Ts on rows that mix both halves alike: each kind needs the same T, so the pair fails together
    pair = fit_report(logits, labels, "unit", yes_no=torch.arange(100) % 2 == 0)
    assert pair["temperature"] == 1.0 and "temperature_yes_no" not in pair
    assert set(pair["temperature_fit"]["rejected"]) == {"temperature", "temperature_yes_no"}
    assert kept_at_one(pair) and "without --yes-no" in pair["temperature_source"]


def test_transfer_carries_the_gate(tmp_path, capsys):
    """--transfer-from applies the gate to a source fitted before it, and carries a rejected fit's T = 1 and reason;
    the About tab then names why T = 1."""
    from medvqa.app.about import _ece

    ck = tiny_checkpoint(tmp_path, "baseline")
    bad = {"n": 9, "nll_before": 2.0, "nll_after": 1.5, "ece_before": 10.0, "ece_after": 12.0}
    for name, entries in {"ungated": {"temperature": 1.7, "temperature_source": "old fit", "temperature_fit": bad},
                          "gated": gate({"temperature": 1.7}, bad, "new fit"),
                          "good": gate({"temperature": 1.7}, bad | {"ece_after": 8.0}, "good fit")}.items():
        (tmp_path / name).mkdir()
        for f in ck.iterdir():
            if f.is_file():
                (tmp_path / name / f.name).write_bytes(f.read_bytes())
        write_temperature(tmp_path / name, entries)
        assert main(["calibrate", "--checkpoint", str(ck), "--transfer-from", str(tmp_path / name), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        cfg = json.loads((ck / "config.json").read_text())
        assert cfg["temperature"] == out["temperature"] == (1.7 if name == "good" else 1.0), name
        assert "temperature_fit" not in cfg and kept_at_one(cfg) == (name != "good")
        assert cfg["temperature_source"].count(KEPT_AT_ONE) == (name != "good")
        assert _ece({"ece": 12.0, "ece_calibrated": 12.0}, cfg).startswith("12.0 (T = 1: the fitted T did not lower") \
            == (name != "good")


def test_two_temperatures_fit_two_regimes_and_keep_the_argmax():
    """Rows whose top answer is yes / no overconfident by 3, the rest by 1.5: one T fits neither, two fit
    each, and the calibrated confidence is better than with one (ECE on the same rows)."""
    answers = ["yes", "no", "liver", "lung", "heart", "brain"]
    z, labels = _overconfident(c=6, sharpen=1.0)                                 # calibrated at T = 1
    yn = yes_no_rows(z, answers)
    logits = torch.where(yn[:, None], 3.0 * z, 1.5 * z)                         # (N, C), argmax unchanged
    assert torch.equal(yes_no_rows(logits, answers), yn) and 0.2 < yn.float().mean() < 0.5
    one, two = fit_report(logits, labels, "unit"), fit_report(logits, labels, "unit", yes_no=yn)
    assert two["temperature_yes_no"] == pytest.approx(3.0, rel=0.15) and two["temperature"] == pytest.approx(1.5, rel=0.15)
    assert "temperature_yes_no" not in one
    assert two["temperature_fit"]["ece_after"] < one["temperature_fit"]["ece_after"]
    assert two["temperature_fit"]["nll_after"] < one["temperature_fit"]["nll_after"]
    t = row_temperatures(logits, answers, two)                                    # (N,)
    assert torch.equal(t == two["temperature_yes_no"], yn)
    assert torch.equal(top1(logits, t)[0], logits.argmax(-1))
    assert describe(two) == f"T = {two['temperature']:.3g}, yes/no {two['temperature_yes_no']:.3g}"
    assert describe(one) == f"T = {one['temperature']:.3g}"


def test_percent_never_claims_certainty():
    assert [percent(p) for p in (1.0, 0.9996, 0.995, 0.994, 0.5, 0.012, 0.004, 0.0)] == [
        "> 99 %", "> 99 %", "> 99 %", "99 %", "50 %", "1 %", "< 1 %", "< 1 %"]


def test_stored_temperature_is_applied_after_reload(tmp_path):
    from medvqa.predict import Predictor

    ck = tiny_checkpoint(tmp_path, "baseline")
    im = Image.new("RGB", (40, 40), (90, 90, 90))
    q = "Is there a fracture?"
    raw = Predictor.load(ck).probs([im], [q])[0]                                  # (C,) at T = 1
    Predictor._cache.clear()
    before = json.loads((ck / "config.json").read_text())
    write_temperature(ck, {"temperature": 3.0, "temperature_source": "unit test"})
    after = json.loads((ck / "config.json").read_text())
    assert after == before | {"temperature": 3.0, "temperature_source": "unit test"}   # other keys kept
    assert not list(ck.glob(".config.json.tmp*"))                                 # written whole, nothing left over
    p = Predictor.load(ck)
    assert p.temperature == 3.0
    a = p.answer(im, q, top_k=4)
    expected = probabilities(raw.log(), 3.0)                                      # softmax(log p / T) = softmax(z / T)
    assert a.text == p.vocab.answers[int(raw.argmax())]
    assert a.score == pytest.approx(float(expected.max()), abs=1e-4) and a.score < float(raw.max())
    assert [s for _, s in a.top_k] == pytest.approx(expected.sort(descending=True).values.tolist(), abs=1e-4)
    assert torch.allclose(p.probs([im], [q])[0], raw, atol=1e-6)                  # the model's own softmax stays T = 1
    Predictor._cache.clear()
    # A second T for yes / no top answers: the row's own T is applied; a later one-T fit drops it.
    top_is_yes_no = p.vocab.answers[int(raw.argmax())] in ("yes", "no")
    write_temperature(ck, {"temperature": 3.0, "temperature_yes_no": 0.5, "temperature_source": "unit test"})
    a = Predictor.load(ck).answer(im, q)
    assert a.score == pytest.approx(float(probabilities(raw.log(), 0.5 if top_is_yes_no else 3.0).max()), abs=1e-4)
    assert a.score != pytest.approx(float(probabilities(raw.log(), 3.0 if top_is_yes_no else 0.5).max()), abs=1e-4)
    Predictor._cache.clear()
    assert "temperature_yes_no" not in write_temperature(ck, {"temperature": 2.0, "temperature_source": "unit test"})


def test_train_fits_t_and_calibrate_refits_transfers_and_refuses(tmp_path, capsys):
    """`train` fits T on its held-out slice; `calibrate` refits the same T; a refit on all of train
    has no held-out questions (one-line error) and takes T from the held-out run instead."""
    from medvqa.predict import Predictor

    make_cases_csv(tmp_path / "data", 24, n_test=8)
    common = ["train", "--model", "baseline", "--preset", "tiny", "--dataset", "folder",
              "--root", str(tmp_path / "data"), "--epochs", "4", "--report-test", "--json"]
    assert main(common + ["--out", str(tmp_path / "held"), "--workdir", str(tmp_path / "r1"), "--val-fraction", "0.25"]) == 0
    m = json.loads(capsys.readouterr().out)
    cfg = json.loads((tmp_path / "held" / "config.json").read_text())
    assert cfg["temperature"] > 0 and cfg["temperature_fit"]["n"] == 4
    # the command that made it, though this process's sys.argv is pytest's
    assert cfg["command"] == "python -m medvqa " + shlex.join(common + ["--out", str(tmp_path / "held"), "--workdir",
                                                                        str(tmp_path / "r1"), "--val-fraction", "0.25"])
    assert cfg["temperature_source"].startswith("fitted on a held-out 25% of train questions (seed 0): 4 questions")
    assert "ece_calibrated" in m["test"] and "ece" in m["test"]

    def fitted(c):   # the T the fit found, applied or (the ECE gate) kept out
        return c["temperature_fit"].get("rejected", c)["temperature"]

    t_train = fitted(cfg)
    if "rejected" in cfg["temperature_fit"]:   # the gate kept T = 1, and test's "calibrated" ECE is at T = 1
        assert cfg["temperature"] == 1.0 and m["test"]["ece_calibrated"] == m["test"]["ece"]
    else:
        assert cfg["temperature"] == t_train
    cfg["temperature"] = 1.0
    (tmp_path / "held" / "config.json").write_text(json.dumps(cfg))
    Predictor._cache.clear()
    assert main(["calibrate", "--checkpoint", str(tmp_path / "held"), "--json"]) == 0    # root from the train command
    assert fitted(json.loads(capsys.readouterr().out)) == pytest.approx(t_train, abs=1e-3)
    assert main(["calibrate", "--checkpoint", str(tmp_path / "held"), "--yes-no", "--transfer-from",
                 str(tmp_path / "held")]) == 2
    assert "give one" in capsys.readouterr().err
    rc = main(["calibrate", "--checkpoint", str(tmp_path / "held"), "--yes-no"])   # 4 questions: maybe one kind only
    out, err = capsys.readouterr()
    two = json.loads((tmp_path / "held" / "config.json").read_text())
    has_two = "temperature_yes_no" in two or "temperature_yes_no" in two["temperature_fit"].get("rejected", {})
    assert (rc, has_two) in ((0, True), (2, False)), err
    assert rc == 0 and ("yes/no" in describe(two) or "rejected" in two["temperature_fit"]) and two["temperature_source"] \
        in out or err.strip().count("\n") == 0 and "without --yes-no" in err

    assert main(common + ["--out", str(tmp_path / "all"), "--workdir", str(tmp_path / "r0"), "--val-fraction", "0"]) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "all" / "config.json").read_text())["temperature"] == 1.0
    assert main(["calibrate", "--checkpoint", str(tmp_path / "all")]) == 2
    err = capsys.readouterr().err
    assert "no held-out questions" in err and err.strip().count("\n") == 0
    assert main(["calibrate", "--checkpoint", str(tmp_path / "all"), "--transfer-from", str(tmp_path / "held")]) == 0
    moved = json.loads((tmp_path / "all" / "config.json").read_text())
    assert moved["temperature"] == json.loads((tmp_path / "held" / "config.json").read_text())["temperature"]
    assert moved["temperature_source"].startswith("transferred from held (baseline on folder; fitted on a held-out 25%")
    assert "temperature_fit" not in moved
    assert main(["calibrate", "--checkpoint", str(tmp_path / "held"), "--transfer-from", str(tmp_path / "all")]) == 2
    Predictor._cache.clear()


def test_eval_reports_ece_before_and_after_with_the_same_accuracy(tmp_path, capsys):
    from medvqa.predict import Predictor

    make_cases_csv(tmp_path / "data", 16)
    ck = tiny_checkpoint(tmp_path, "baseline", steps=20)
    args = ["eval", "--checkpoint", str(ck), "--dataset", "folder", "--root", str(tmp_path / "data"), "--split", "train"]
    assert main(args + ["--json"]) == 0
    r1 = json.loads(capsys.readouterr().out)
    assert r1["calibration"]["temperature"] == 1.0 and r1["calibration"]["ece_before"] == r1["calibration"]["ece_after"]
    write_temperature(ck, {"temperature": 0.25, "temperature_source": "unit test"})
    Predictor._cache.clear()
    assert main(args + ["--json"]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2["overall"] == r1["overall"] and r2["calibration"]["ece_before"] == r1["ece"]
    assert r2["ece"] == r2["calibration"]["ece_after"] != r1["ece"]
    assert main(args) == 0
    assert "before temperature scaling" in capsys.readouterr().out
    Predictor._cache.clear()


def test_the_app_marks_uncertain_answers_and_names_the_runner_up():
    from medvqa.app.common import answer_markdown, top_k_markdown

    sure = {"answer": "yes", "score": 0.9991, "top_k": [["yes", 0.9991], ["no", 0.0009]], "uncertain": False}
    unsure = {"answer": "no", "score": 0.42, "top_k": [["no", 0.42], ["yes", 0.40]], "uncertain": True}
    assert answer_markdown(sure) == "**yes** (> 99 %)"
    assert answer_markdown(unsure) == "**no** (42 %) · *uncertain*, runner-up: **yes** (40 %)"
    table = top_k_markdown(sure["top_k"])
    assert "| yes | > 99 % |" in table and "| no | < 1 % |" in table and "100" not in table
