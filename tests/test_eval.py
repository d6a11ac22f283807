import pytest

from medvqa.data import Record
from medvqa.eval import evaluate, expected_calibration_error


def _recs():
    return [Record("1", "i", "q", "Yes", "CLOSED", organ="CHEST", question_type="PRES"),
            Record("2", "i", "q", "no", "CLOSED", organ="HEAD", question_type="PRES, POS"),
            Record("3", "i", "q", "Left lung", "OPEN", organ="CHEST", question_type="POS"),
            Record("4", "i", "q", "liver", "OPEN", organ="ABD", question_type="ORGAN")]


def test_open_closed_overall():
    res = evaluate(_recs(), {"1": "yes", "2": "yes", "3": "the left lung"})   # 4 has no prediction
    assert res["closed"] == 50.0 and res["open"] == 50.0 and res["overall"] == 50.0
    assert (res["n"], res["n_open"], res["n_closed"], res["missing_predictions"]) == (4, 2, 2, 1)
    assert res["by_organ"]["CHEST"] == {"acc": 100.0, "n": 2}
    assert res["by_question_type"]["POS"] == {"acc": 50.0, "n": 2}          # "PRES, POS" counts under both


def test_ece():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([0.9] * 10, [1] * 5 + [0] * 5) == pytest.approx(40.0)
    res = evaluate(_recs(), {"1": "yes"}, {"1": 0.8})
    assert res["ece"] == pytest.approx(20.0)
