"""Review store: upsert per (reviewer, case, model), resume, CSV export, agreement and κ, the map
shown kept with the verdict, and databases written before the map columns existed."""
import csv
import sqlite3
from pathlib import Path

import pytest

from PIL import Image

from medvqa.review import ReviewStore, cohen_kappa


def test_record_resume_export_and_summary(tmp_path):
    s = ReviewStore(tmp_path / "r.sqlite")
    s.record("ann", "examples", "1", "cmdpi-vqa-rad", "agree", question="q1")
    s.record("ann", "examples", "1", "cmdpi-vqa-rad", "disagree")          # replaces, not duplicates
    s.record("ann", "examples", "2", "cmdpi-vqa-rad", "corrected", corrected_answer="left lung")
    s.record("bob", "examples", "1", "cmdpi-vqa-rad", "disagree")
    s.record("bob", "examples", "2", "cmdpi-vqa-rad", "agree")
    assert ReviewStore(tmp_path / "r.sqlite").reviewed("ann", "examples") == {"1", "2"}   # survives reopening
    rows = list(csv.DictReader(open(s.export_csv(tmp_path / "out.csv"))))
    assert len(rows) == 4 and {r["verdict"] for r in rows if r["reviewer"] == "ann"} == {"disagree", "corrected"}
    summ = s.summary()
    assert summ["models"]["cmdpi-vqa-rad"] == {"n": 4, "agree": 1, "agree_pct": 25.0, "map_wrong": 0}
    assert summ["kappa"]["ann vs bob"]["n"] == 2


def test_bad_reviews_are_refused(tmp_path):
    s = ReviewStore(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match="reviewer"):
        s.record(" ", "examples", "1", "m", "agree")
    with pytest.raises(ValueError, match="verdict"):
        s.record("ann", "examples", "1", "m", "maybe")
    with pytest.raises(ValueError, match="corrected answer"):
        s.record("ann", "examples", "1", "m", "corrected")
    assert s.rows() == []


def test_cohen_kappa_known_values():
    assert cohen_kappa([True, False, True, False], [True, False, True, False]) == 1.0
    assert cohen_kappa([True, True, False, False], [True, False, True, False]) == 0.0
    assert cohen_kappa([True, True], [True, True]) is None
    # 20 items: both agree-yes 8, both no 7, ann yes/bob no 3, ann no/bob yes 2 -> κ = 0.5
    a = [True] * 8 + [False] * 7 + [True] * 3 + [False] * 2
    b = [True] * 8 + [False] * 7 + [False] * 3 + [True] * 2
    assert cohen_kappa(a, b) == 0.5


def test_the_map_shown_is_kept_with_the_verdict_and_exported(tmp_path):
    s = ReviewStore(tmp_path / "r.sqlite")
    shown = Image.new("RGB", (40, 30), (200, 10, 10))
    s.record("ann", "examples", "1", "cmi-mtl-slake", "agree", map_image=shown, map_method="query-attention",
             map_wrong=True)
    s.record("ann", "examples", "1", "cmdpi-slake", "agree")                  # the API records without a map
    rows = {r["model"]: r for r in csv.DictReader(open(s.export_csv(tmp_path / "out.csv")))}
    cmi = rows["cmi-mtl-slake"]
    assert cmi["map_method"] == "query-attention" and cmi["map_wrong"] == "1"
    with Image.open(cmi["map_png"]) as im:
        assert im.size == (40, 30) and im.convert("RGB").getpixel((5, 5)) == (200, 10, 10)
    assert rows["cmdpi-slake"]["map_png"] == "" and rows["cmdpi-slake"]["map_wrong"] == "0"
    assert s.summary()["models"]["cmi-mtl-slake"]["map_wrong"] == 1


OLD_COLUMNS = ("reviewer", "source", "qid", "image", "question", "ground_truth", "model", "model_answer", "verdict",
               "corrected_answer", "comment", "updated")


def test_an_old_review_database_opens_with_its_rows_intact(tmp_path):
    """A database from before the map columns: made by hand with the first schema, then opened."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"CREATE TABLE reviews ({', '.join(OLD_COLUMNS)}, PRIMARY KEY (reviewer, source, qid, model))")
        db.execute(f"INSERT INTO reviews VALUES ({', '.join('?' * len(OLD_COLUMNS))})",
                   ("ann", "examples", "7", "img.png", "Is it?", "yes", "baseline-slake", "no", "corrected", "yes",
                    "old comment", "2026-01-02T03:04:05"))
    s = ReviewStore(path)
    [old] = s.rows()
    assert {k: old[k] for k in OLD_COLUMNS} == dict(zip(OLD_COLUMNS, (
        "ann", "examples", "7", "img.png", "Is it?", "yes", "baseline-slake", "no", "corrected", "yes",
        "old comment", "2026-01-02T03:04:05")))
    assert old["map_png"] == "" and old["map_wrong"] == 0
    s.record("bob", "examples", "7", "baseline-slake", "agree", map_image=Image.new("RGB", (8, 8)), map_wrong=True)
    assert len(s.rows()) == 2 and ReviewStore(path).reviewed("ann", "examples") == {"7"}


def test_a_case_is_recorded_whole_or_not_at_all(tmp_path):
    """A refused verdict for any model leaves no row (nor map) for the others: the case would otherwise
    count as reviewed and Load would resume past it."""
    s = ReviewStore(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match="corrected answer"):
        s.record_case("Dr S", "examples", "ex0", [
            {"model": "cmi-mtl-vqa-rad", "verdict": "agree", "map_image": Image.new("RGB", (8, 8))},
            {"model": "cmdpi-vqa-rad", "verdict": "corrected", "corrected_answer": " "}])
    assert s.rows() == [] and s.reviewed("Dr S", "examples") == set() and not s.maps_dir.exists()
    s.record_case("Dr S", "examples", "ex0", [{"model": "cmi-mtl-vqa-rad", "verdict": "agree"},
                                              {"model": "cmdpi-vqa-rad", "verdict": "corrected",
                                               "corrected_answer": "yes"}])
    assert [r["model"] for r in s.rows()] == ["cmdpi-vqa-rad", "cmi-mtl-vqa-rad"]


def test_a_failed_write_keeps_the_earlier_verdicts_map_and_ids_are_kept_as_given(tmp_path):
    """The new map replaces the old one only once its row is committed: with the database locked the
    earlier verdict keeps the map it was given. A case id with spaces resumes (it is stored as listed)."""
    s = ReviewStore(tmp_path / "r.sqlite")
    s.record("ann", "upload:x.zip", " q1", "m", "agree", map_image=Image.new("RGB", (8, 8), (0, 0, 255)))
    assert s.reviewed("ann", "upload:x.zip") == {" q1"}
    png = s.rows()[0]["map_png"]
    lock = sqlite3.connect(s.path)
    lock.execute("BEGIN EXCLUSIVE")
    s._db = lambda: sqlite3.connect(s.path, timeout=0.1)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            s.record("ann", "upload:x.zip", " q1", "m", "disagree", map_image=Image.new("RGB", (8, 8), (255, 0, 0)))
    finally:
        lock.rollback()
        lock.close()
    with Image.open(png) as im:
        assert im.convert("RGB").getpixel((1, 1)) == (0, 0, 255)
    assert s.rows()[0]["verdict"] == "agree" and sorted(p.name for p in s.maps_dir.iterdir()) == [Path(png).name]


def test_missing_text_and_long_comments_are_refused_with_a_message(tmp_path):
    s = ReviewStore(tmp_path / "r.sqlite")
    for reviewer, qid, kw, msg in [(None, "1", {}, "reviewer"), ("ann", None, {}, "case id"),
                                   ("ann", " ", {}, "case id"), ("ann", "1", {"comment": 5}, "comment must be text"),
                                   ("ann", "1", {"comment": "x" * 2001}, "at most 2,000"),
                                   ("x" * 100_000, "1", {}, "reviewer name has 100,000 characters; at most 200"),
                                   ("ann", "q" * 1_000_000, {}, "case id has 1,000,000 characters"),
                                   ("ann", "1", {"verdict": "corrected", "corrected_answer": "y" * 201}, "at most 200"),
                                   ("ann", "1", {"verdict": "corrected", "corrected_answer": None}, "corrected answer")]:
        with pytest.raises(ValueError, match=msg):
            s.record(reviewer, "examples", qid, "m", kw.pop("verdict", "agree"), **kw)
    s.record("ann", "examples", "1", "m", "agree", corrected_answer=None, comment=None)   # None text is empty
    assert s.reviewed("x" * 100_000, "examples") == set()   # only writing is capped: Load and the steps still read
    assert [(r["corrected_answer"], r["comment"]) for r in s.rows()] == [("", "")]


def test_export_quotes_formula_like_cells_but_the_store_keeps_them(tmp_path):
    s = ReviewStore(tmp_path / "r.sqlite")
    raw = ['=HYPERLINK("http://x","y")', "+1", "-2", "@SUM(A1)", "\t=1", "\r=1"]
    for i, text in enumerate(raw):
        s.record("ann", "examples", str(i), "m", "agree", question=text, comment=raw[0])
    s.record("ann", "examples", "9", "m", "agree", question="fine - really", comment="a=b")
    rows = {r["qid"]: r for r in csv.DictReader(open(s.export_csv(tmp_path / "out.csv"), newline=""))}
    assert [rows[str(i)]["question"] for i in range(len(raw))] == ["'" + t for t in raw]
    assert rows["0"]["comment"] == "'" + raw[0] and (rows["9"]["question"], rows["9"]["comment"]) == ("fine - really",
                                                                                                     "a=b")
    assert rows["0"]["map_wrong"] == "0" and [r["question"] for r in s.rows()][:len(raw)] == raw   # stored raw


# -- the Review tab's handlers, on tiny checkpoints -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    import shutil

    from tests.helpers import tiny_checkpoint

    tmp = tmp_path_factory.mktemp("review-cks")
    made = {m: tiny_checkpoint(tmp / m, m) for m in ("cmi-mtl", "baseline")}
    for m, ck in made.items():
        for dataset in ("vqa-rad", "slake"):
            shutil.copytree(ck, tmp / "cks" / f"{m}-{dataset}")
    return tmp / "cks"


@pytest.fixture
def tab(tiny_checkpoints, tmp_path, monkeypatch):
    import tempfile

    from medvqa.app import review

    monkeypatch.setenv("MEDVQA_CHECKPOINTS", str(tiny_checkpoints))
    monkeypatch.setenv("MEDVQA_DATA", str(tmp_path / "user-data"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))        # export folders land here, to count them
    monkeypatch.setattr(review, "_export_dir", None, raising=False)
    return review


def _slots(*per_model):
    """save_case's slot values: (verdict, corrected answer, map-wrong box) per slot."""
    from medvqa.app.common import N_SLOTS

    return [v for s in list(per_model) + [(None, "", False)] * (N_SLOTS - len(per_model)) for v in s]


def test_save_writes_every_models_verdict_or_none(tab):
    import gradio as gr

    cs, i, loaded, *view = tab.open_cases("examples", None, "vqa-rad", "Dr S")
    store = ReviewStore()
    with pytest.raises(gr.Error, match="choose a verdict for Baseline"):
        tab.save_case(cs, i, loaded, "Dr S", "", view[-1], *_slots(("agree", "", False)))
    with pytest.raises(gr.Error, match="corrected answer"):
        tab.save_case(cs, i, loaded, "Dr S", "", view[-1], *_slots(("agree", "", False), ("corrected", "", False)))
    assert store.rows() == [] and tab.open_cases("examples", None, "vqa-rad", "Dr S")[1] == i   # not skipped
    tab.save_case(cs, i, loaded, "Dr S", "ok", view[-1], *_slots(("agree", "", True), ("corrected", "yes", False)))
    assert {r["model"]: r["map_wrong"] for r in store.rows()} == {"cmi-mtl-vqa-rad": 1, "baseline-vqa-rad": 0}


def test_save_records_the_models_shown_not_the_radio_now(tab):
    """Loaded with VQA-RAD's models, the radio then moved to SLAKE without Load: the stored rows are
    the VQA-RAD models whose answers and maps were shown. Moving the radio re-shows the case with the
    SLAKE models, and those are what Save then records."""
    cs, i, loaded, *view = tab.open_cases("examples", None, "vqa-rad", "Dr S")
    tab.save_case(cs, i, loaded, "Dr S", "", view[-1], *_slots(("agree", "", False), ("disagree", "", False)))
    rows = ReviewStore().rows()
    assert {r["model"] for r in rows} == {"cmi-mtl-vqa-rad", "baseline-vqa-rad"}
    shown = view[4]["value"] + view[4 + tab.SLOT_WIDTH]["value"]   # the two answers' markdown
    assert all(r["model_answer"] and r["model_answer"] in shown for r in rows)
    loaded, *view = tab.switch_models(cs, i, "slake", "Dr S", loaded)
    tab.save_case(cs, i, loaded, "Dr S", "", view[-1], *_slots(("agree", "", False), ("agree", "", False)))
    assert {r["model"] for r in ReviewStore().rows()} - {r["model"] for r in rows} == {"cmi-mtl-slake", "baseline-slake"}


def test_review_api_refuses_bad_input_with_a_message(tab):
    import gradio as gr

    ok = dict(reviewer="Dr A", source="examples", qid="ex0", model="cmi-mtl-vqa-rad", verdict="agree")
    for bad, msg in [({"model": "no-such-model"}, "unknown model"), ({"source": "elsewhere"}, "unknown source"),
                     ({"source": None}, "unknown source"), ({"qid": None}, "case id"), ({"reviewer": None}, "reviewer"),
                     ({"verdict": "corrected", "corrected_answer": None}, "corrected answer"),
                     ({"comment": "x" * 1_000_000}, "at most 2,000")]:
        with pytest.raises(gr.Error, match=msg):
            tab.review_api(**{**ok, **bad})
    assert ReviewStore().rows() == []
    tab.review_api(**ok, corrected_answer=None, comment=None)
    tab.review_api(**{**ok, "source": "upload:cases.zip"})
    assert len(ReviewStore().rows()) == 2


def test_exports_leave_one_folder_per_process(tab, tmp_path):
    ReviewStore().record("ann", "examples", "1", "m", "agree", comment="=1+1")
    first = ReviewStore().export_csv(tab.export_path())
    assert ReviewStore().export_csv(tab.export_path()) == first and "'=1+1" in tab.review_export_api()
    assert list(tmp_path.glob("medvqa-reviews-*")) == [first.parent] and list(first.parent.iterdir()) == [first]


def test_a_case_no_model_can_answer_is_shown_with_the_reason_and_can_be_skipped(tab, tmp_path):
    """A 600-character question in an uploaded list (or a checkpoint removed since Load) had raised inside
    the handler: Load, Skip and Save all stopped at that case with a bare error."""
    import shutil

    cs, i, loaded, *view = tab.open_cases("examples", None, "vqa-rad", "Dr S")
    long = [{**cs[0], "question": "why " * 150}] + cs[1:]
    pos, im, q, gt, *slots = tab.show(long, 0, None, "Dr S", loaded["source"], loaded["models"])
    first = slots[0]["value"]
    assert "cannot answer this case" in first and "too long" in first and slots[-1][0] is None
    assert [u["value"] for u in slots[1:5]] == [None, "", None, False]   # the last case's verdict is cleared
    import gradio as gr
    with pytest.raises(gr.Error, match="did not answer this case"):   # a verdict left behind is not recorded
        tab.save_case(long, 0, loaded, "Dr S", "", slots[-1], *_slots(("agree", "", True), ("agree", "", False)))
    assert ReviewStore().rows() == []
    ck = tmp_path / "gone"
    shutil.copytree(loaded["models"][0], ck)
    models = [str(ck)] + loaded["models"][1:]
    shutil.rmtree(ck)
    j, *after = tab.step(cs, 0, 1, {**loaded, "models": models}, "Dr S")   # Skip still moves on
    assert j == 1 and "Load again" in after[4]["value"]
