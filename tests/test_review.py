"""Review store: upsert per (reviewer, case, model), resume, CSV export, agreement and κ, the map
shown kept with the verdict, and databases written before the map columns existed."""
import csv
import sqlite3

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
