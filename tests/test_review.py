"""Review store: upsert per (reviewer, case, model), resume, CSV export, agreement and κ."""
import csv

import pytest

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
    assert summ["models"]["cmdpi-vqa-rad"] == {"n": 4, "agree": 1, "agree_pct": 25.0}
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
