import io

import numpy as np
import pytest
from PIL import Image

from medvqa.data import ImageError
from medvqa.predict import Predictor
from medvqa.train.checkpoint import CheckpointError
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("pred"))


def test_every_input_type(ckpt, tmp_path):
    p = Predictor.load(ckpt)
    arr = (np.random.default_rng(0).random((50, 60)) * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    im.save(tmp_path / "x.png")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    answers = [p.answer(src, "Is there a fracture?") for src in (tmp_path / "x.png", str(tmp_path / "x.png"), im, arr, buf.getvalue())]
    assert len({a.text for a in answers}) == 1                      # same image, same answer, whatever the type
    a = answers[0]
    assert a.text in p.vocab.answers and 0 < a.score <= 1 and len(a.top_k) == min(5, len(p.vocab))
    assert a.top_k[0][0] == a.text and a.kind in ("open", "closed")
    # CMI-MTL's AHead writes free text for open answers only (it learnt from open questions)
    assert (a.free_text is None) == (a.kind == "closed") and all(isinstance(x.free_text, (str, type(None))) for x in answers)
    many = p.answer_batch([im] * 2 + [arr[::-1]] * 2, ["Is there a fracture?", "Where is the lesion?"] * 2)
    assert all((x.free_text is None) == (x.kind == "closed") for x in many)
    assert Predictor.load(ckpt) is p                                # cached


def test_bad_inputs_clear_errors(ckpt, tmp_path):
    p = Predictor.load(ckpt)
    im = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="empty"):
        p.answer(im, "   ")
    with pytest.raises(ValueError, match="too long"):
        p.answer(im, "why " * 200)
    for q, kind in ((5, "int"), (["a"], "list")):   # from an API client
        with pytest.raises(ValueError, match=f"the question must be text, not {kind}"):
            p.answer(im, q)
    with pytest.raises(ImageError, match="not a readable image"):
        p.answer(b"garbage", "Is it?")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Predictor.load(tmp_path / "missing")


def test_answer_batch_matches_single(ckpt):
    p = Predictor.load(ckpt)
    ims = [Image.new("RGB", (40, 40), (i * 60, i * 60, i * 60)) for i in range(3)]
    qs = ["Is there a fracture?", "Which organ is shown?", "Where is the lesion?"]
    batch = p.answer_batch(ims, qs)
    for im, q, b in zip(ims, qs, batch):
        s = p.answer(im, q)
        assert s.text == b.text and s.score == pytest.approx(b.score, abs=1e-4)
