"""Encode once, micro-batch across requests, ship the nearest-case indexes (issue #35)."""
import concurrent.futures as cf
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medvqa.predict import Predictor
from tests.helpers import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speed")
    return {m: Predictor.load(tiny_checkpoint(tmp / m, m)) for m in ("cmi-mtl", "cmdpi", "baseline")}


def _image(i: int) -> Image.Image:
    rng = np.random.default_rng(i)
    return Image.fromarray((rng.random((40 + i, 48)) * 255).astype(np.uint8)).convert("RGB")


def _answer_uncached(p, im, q):
    """Today's path before the shared backbone: a backbone pass of its own, then the head."""
    enc = p.encoders
    with torch.inference_mode():
        g, loc = enc.encode_image(enc.preprocess([im]))
        batch = {"image_tokens": torch.cat([g[:, None], loc], 1), **enc.question_inputs([q])}
        return p.model(batch)["logits"].float().softmax(-1)[0]


def test_one_backbone_pass_serves_every_model_and_map(cks):
    bb = cks["cmi-mtl"].backbone
    assert all(p.backbone is bb for p in cks.values())          # one backbone config: one shared backbone
    bb.clear()
    im, q = _image(1), "Is there a fracture?"
    n = len(bb.batches)
    for p in cks.values():
        probs = p.probs([im], [q])[0]
        assert torch.equal(probs, _answer_uncached(p, im, q))   # the same answers as a pass of their own
        p.nearest(im, q, {"features": np.eye(3, len(p.features(im, q)["fused"]), dtype=np.float32),
                          "records": [{"qid": str(i)} for i in range(3)]}, k=2)
        for m in ("query-attention", "rollout", "token-rollout"):
            if m in p.methods:
                p.explain(im, q, method=m)
    assert len(bb.batches) == n + 1                              # answers, features, rollouts: one pass
    p = cks["cmi-mtl"]
    p.explain(im, "Which organ is shown?", method="rollout", target=p.vocab.answers[0])
    assert len(bb.batches) == n + 1                              # a new question or target: no re-encode


def test_cached_maps_equal_uncached(cks):
    from medvqa.explain.gradcam import explain

    im, q = _image(2), "Where is the lesion?"
    for p in cks.values():
        for m in ("rollout", "token-rollout") + (("query-attention",) if "query-attention" in p.methods else ()):
            with torch.enable_grad():
                fresh = explain(p.encoders, p.model, im, q, method=m)
            np.testing.assert_allclose(p.explain(im, q, method=m), fresh, atol=1e-5)


def test_concurrent_requests_share_a_batch_and_never_mix(cks):
    p = cks["cmdpi"]
    cases = [(_image(10 + i), f"Question number {i}?") for i in range(20)]
    want = [p.answer(im, q).top_k for im, q in cases]
    p.backbone.clear()
    p.backbone.wait_s = 0.05                                     # a generous window: the threads surely overlap
    n = len(p.backbone.batches)
    start = threading.Barrier(20)

    def ask(case):
        start.wait()
        return p.answer(*case).top_k
    try:
        with cf.ThreadPoolExecutor(20) as ex:
            got = list(ex.map(ask, cases))
    finally:
        p.backbone.wait_s = 0.005
    assert max(p.backbone.batches[n:]) > 1 and len(p.backbone.batches) - n < 20
    for w, g in zip(want, got):
        assert [a for a, _ in g] == [a for a, _ in w]
        assert np.allclose([s for _, s in g], [s for _, s in w], atol=1e-4)


def test_backbone_error_reaches_every_waiter_and_it_keeps_serving(cks, monkeypatch):
    p = cks["baseline"]
    bb = p.backbone
    bb.clear()
    monkeypatch.setattr(bb, "_forward", lambda px: (_ for _ in ()).throw(RuntimeError("backbone down")))
    with pytest.raises(RuntimeError, match="backbone down"):
        p.answer(_image(3), "Is it?")
    monkeypatch.undo()
    assert p.answer(_image(3), "Is it?").text


def test_shipped_indexes_follow_the_weights():
    from medvqa.explain.neighbours import SHIPPED_INDEXES, load_index, weights_digest

    shipped = sorted((ROOT / "assets" / "checkpoints").glob("*/config.json"))
    assert shipped
    for cfg in shipped:
        ck = cfg.parent
        f = SHIPPED_INDEXES / f"{ck.name}.npz"
        assert f.is_file(), f"python -m medvqa index --checkpoint {ck.name} --dataset DATASET --root DATASET_ROOT"
        with np.load(f) as z:
            meta = json.loads(str(z["meta"]))
            assert z["features"].dtype == np.float16 and len(z["features"]) == len(meta["records"])
        assert meta["weights"] == weights_digest(ck), f"{f.name} is stale"
        assert meta["dataset"] == json.loads(cfg.read_text())["dataset"]
        r = meta["records"][0]
        assert set(r) == {"qid", "image", "question", "answer"} and not Path(r["image"]).is_absolute()
        assert load_index(ck) is not None


def test_index_command_then_nearest_without_the_folder(cks, tmp_path, monkeypatch):
    """`medvqa index` into the user cache; the app's table then shows the cases without any dataset folder."""
    from medvqa.app.ask import _nearest
    from medvqa.cli import main
    from medvqa.explain.neighbours import load_index
    from tests.helpers import make_cases_csv

    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDVQA_DATA_ROOT", str(tmp_path / "no-datasets"))
    p = cks["cmi-mtl"]
    csv = make_cases_csv(tmp_path / "cases", 12)
    assert load_index(p.path) is None
    assert main(["index", "--checkpoint", str(p.path), "--dataset", "folder", "--root", str(csv), "--json"]) == 0
    index = load_index(p.path)
    assert index["features"].shape[0] == 12 and index["records"][0]["image"] == "img0.png"
    table, thumbs = _nearest(p.path, Image.open(tmp_path / "cases" / "img1.png").convert("RGB"), "Is this an MRI?",
                             "vqa-rad")
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]   # below the header
    assert thumbs is None and len(rows) == 4 and rows[0].endswith("| 1.00 |")
    assert main(["index", "--checkpoint", str(p.path), "--dataset", "folder", "--root", str(tmp_path / "nope")]) == 2


def test_index_builds_in_the_background(cks, tmp_path, monkeypatch):
    from medvqa.data import load_split
    from medvqa.explain.neighbours import IndexBuilds, load_index
    from tests.helpers import make_cases_csv

    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    p = cks["baseline"]
    csv = make_cases_csv(tmp_path / "cases", 10)
    builds = IndexBuilds()
    builds.start(p.path, "folder", csv)
    import time

    t0 = time.time()
    while load_index(p.path) is None and time.time() - t0 < 120:
        time.sleep(0.2)
    assert builds.progress(p.path) == {"done": 10, "total": 10, "error": None}
    assert len(load_index(p.path)["records"]) == len(load_split("folder", csv, "train").records)


@pytest.mark.parametrize("shipped", [False, True], ids=["tiny", "shipped"])
def test_shared_rollout_pass_gives_each_models_own_map(cks, shipped):
    """explain_many runs the backbone blocks' gradient pass once for every model on it; each model's
    map equals its own Predictor.explain (a pass of its own), and two models' maps differ (no mixing)."""
    from medvqa.predict import explain_many

    ps = ([Predictor.load(f"{m}-vqa-rad") for m in ("cmi-mtl", "cmdpi", "baseline")] if shipped
          else list(cks.values()))
    assert len({p.backbone for p in ps}) == 1
    im, q = (Image.open(ROOT / "assets" / "examples" / json.loads(
        (ROOT / "assets" / "examples" / "examples.json").read_text())[0]["image"]).convert("RGB") if shipped
        else _image(4)), "Is there a mass in the left lung?"
    for method in ("head-rollout", "token-rollout"):   # from block 0: on `tiny` the default start leaves the last block,
        many = explain_many(ps, im, q, [method] * len(ps), layer=0)   # whose head-rollout is one backbone head, the same for every model
        for p, m in zip(ps, many):
            assert np.abs(m - p.explain(im, q, method=method, layer=0)).max() < 1e-4
        assert min(np.abs(a - b).max() for i, a in enumerate(many) for b in many[i + 1:]) > 1e-3
    assert all(w.grad is None for p in ps for w in p.model.parameters())   # input gradients only


def test_answer_and_features_run_the_head_once(cks):
    p = cks["baseline"]
    calls = []
    hook = p.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        im, q = _image(5), "Is the heart enlarged?"
        a = p.answer(im, q)
        f = p.features(im, q)["fused"]
        assert len(calls) == 1 and p.answer(im, q).top_k == a.top_k
        p.answer(im, "Is the lung clear?")                       # another question: the head again
        assert len(calls) == 2
        p.backbone.clear()                                       # the outputs leave the cache with the image
        assert np.array_equal(p.features(im, q)["fused"], f) and len(calls) == 3
    finally:
        hook.remove()


def test_twenty_concurrent_asks_encode_each_image_once(cks):
    """More concurrent images than the cache keeps: every model of an ask still reads its one pass."""
    from medvqa.encode import CACHE_IMAGES
    from medvqa.predict import answer_many

    ps = list(cks.values())
    cases = [(_image(40 + i), f"Question {i}?") for i in range(20)]
    assert len(cases) > CACHE_IMAGES
    want = [[a.top_k for a in answer_many(ps, im, q)] for im, q in cases]
    bb = ps[0].backbone
    bb.clear()
    n = len(bb.batches)
    with cf.ThreadPoolExecutor(20) as ex:
        got = list(ex.map(lambda c: [a.top_k for a in answer_many(ps, *c)], cases))
    assert sum(bb.batches[n:]) == 20
    for w, g in zip(want, got):
        for wm, gm in zip(w, g):
            assert [a for a, _ in gm] == [a for a, _ in wm]
            assert np.allclose([s for _, s in gm], [s for _, s in wm], atol=1e-4)
