import pytest

from medvqa.data import Record
from medvqa.calibration import expected_calibration_error
from medvqa.eval import evaluate, seen_in_train, swap_images


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


def test_seen_in_train_matches_image_and_normalised_answer():
    train = [Record("t1", "i", "other q", "yes", "CLOSED"), Record("t2", "j", "q", "Left lung", "OPEN")]
    seen = seen_in_train(_recs(), train)
    assert seen == [True, False, False, False]               # "Left lung" was seen on image j, not on i
    res = evaluate(_recs(), {"1": "yes", "2": "yes", "3": "left lung"}, seen=seen)
    assert res["by_seen"] == {"image+answer seen in train": {"acc": 100.0, "n": 1},
                              "new answer for its image": {"acc": 33.33, "n": 3}}
    assert "by_seen" not in evaluate(_recs(), {})


def test_swap_images_never_keeps_a_question_on_its_own_image():
    recs = [Record(str(i), f"img{i // 3}", "q", "yes", "CLOSED") for i in range(12)]   # 3 questions an image
    swapped = swap_images(recs, seed=0)
    assert [r.qid for r in swapped] == [r.qid for r in recs]                 # same questions, same order
    assert all(s.image != r.image for s, r in zip(swapped, recs))
    assert {s.image for s in swapped} <= {r.image for r in recs}             # images of the same split
    assert [s.image for s in swap_images(recs, seed=0)] == [s.image for s in swapped]   # reproducible
    assert recs[0].image == "img0"                                           # the input is left as it was
    with pytest.raises(ValueError, match="two different images"):
        swap_images(recs[:3])


def test_ece():
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert expected_calibration_error([0.9] * 10, [1] * 5 + [0] * 5) == pytest.approx(40.0)
    res = evaluate(_recs(), {"1": "yes"}, {"1": 0.8})
    assert res["ece"] == pytest.approx(20.0)


def test_wilson_interval_matches_the_closed_form():
    from medvqa.eval import wilson_interval

    assert wilson_interval(0, 10) == [0.0, 27.75] and wilson_interval(10, 10) == [72.25, 100.0]
    lo, hi = wilson_interval(328, 451)                        # 72.73 %: the interval is not centred on it
    assert lo < 72.73 < hi and (hi - 72.73) < (72.73 - lo) and hi - lo == pytest.approx(8.19, abs=0.01)


def test_paired_comparison_counts_discordant_questions():
    from scipy.stats import binomtest

    from medvqa.eval import paired_comparison

    recs = [Record(str(i), "i", "q", "yes", "CLOSED") for i in range(40)]
    a = {str(i): "yes" for i in range(30)}                    # right on 0..29
    b = {str(i): "yes" for i in range(5, 20)} | {"39": "yes"}  # right on 5..19 and 39
    c = paired_comparison(recs, a, b)
    assert (c["a"], c["b"], c["difference"]) == (75.0, 40.0, 35.0)
    assert (c["only_a_right"], c["only_b_right"]) == (15, 1)
    assert c["mcnemar_p"] == pytest.approx(binomtest(1, 16).pvalue, rel=1e-3)
    lo, hi = c["difference_ci95"]
    assert lo < 35.0 < hi and lo > 0                          # 15 against 1 is not noise
    same = paired_comparison(recs, a, a)
    assert same["difference"] == 0.0 and same["difference_ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0
