import os

import numpy as np
import pytest
from PIL import Image

from medvqa.cli import main
from medvqa.predict import Predictor
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cam"))


def _image():
    a = np.zeros((70, 90), np.uint8)
    a[10:40, 20:60] = 200
    return Image.fromarray(a)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "rollout", "token-rollout",
                                    "head-rollout", "query-attention"])
def test_cam_shape_range(ckpt, method):
    cam = Predictor.load(ckpt).explain(_image(), "Where is the lesion?", method=method)
    assert cam.shape == (70, 90) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0


@pytest.mark.parametrize("method", ["gradcam", "rollout", "token-rollout"])
def test_cam_changes_with_target(ckpt, method):
    p = Predictor.load(ckpt)
    maps = [p.explain(_image(), "Where is the lesion?", method=method, target=a) for a in p.vocab.answers]
    assert max(np.abs(m - maps[0]).mean() for m in maps[1:]) > 1e-3
    with pytest.raises(ValueError, match="not an answer"):
        p.explain(_image(), "Where is the lesion?", target="banana")


def test_token_rollout_reads_more_than_the_cls_row(ckpt):
    """The two rollout readouts come from one R but differ: the tokens the head reads are not only CLS."""
    p = Predictor.load(ckpt)
    cls, tokens = (p.explain(_image(), "Where is the lesion?", method=m) for m in ("rollout", "token-rollout"))
    assert np.abs(cls - tokens).mean() > 1e-3


def test_query_attention_is_cmi_mtls_question_aware_reading(ckpt):
    """CMI-MTL's query attention is where its question-aware queries read the image: it moves with the
    question, not with the answer asked about (no gradient)."""
    p = Predictor.load(ckpt)
    q = "Where is the lesion?"
    a = p.explain(_image(), q, method="query-attention")
    assert np.array_equal(a, p.explain(_image(), q, method="query-attention", target=p.vocab.answers[-1]))
    assert np.abs(a - p.explain(_image(), "Is this a CT scan of the chest?", method="query-attention")).mean() > 1e-3
    assert p.default_method == "head-attention" and np.array_equal(p.explain(_image(), q, method="head-attention"),
                                                                   p.explain(_image(), q))


def test_query_attention_needs_a_question_conditioned_attention(tmp_path):
    """The baseline's map is its pooling weights over the patch grid; CMDPI has no such attention, so
    the method is not offered for it and asking for it says what to use instead."""
    import torch

    from medvqa.explain.gradcam import ImageToLogits, query_attention

    base = Predictor.load(tiny_checkpoint(tmp_path / "b", "baseline"))
    assert "query-attention" in base.methods and base.default_method == "head-attention"
    w = ImageToLogits(base.encoders, base.model, base.encoders.question_inputs(["Is there a fracture?"]))
    x = base.encoders.preprocess([_image().convert("RGB")])
    g = base.encoders.grid
    with torch.no_grad():
        tokens = w.image_tokens(x)                                                   # (1, 1+N, Di)
        pooled = base.model.forward_features(w.batch(tokens))["fused"][:, :base.model.proj_v.out_features]
        weights = base.model.image_attention(w.batch(tokens))                       # (1, 1+N)
    assert torch.allclose(weights.sum(-1), torch.ones(1))
    assert torch.allclose((weights[..., None] * base.model.proj_v(tokens)).sum(1), pooled, atol=1e-5)
    np.testing.assert_allclose(query_attention(w, x, sigma=0), weights[0, -g * g:].reshape(g, g).numpy(), rtol=1e-6)
    cmdpi = Predictor.load(tiny_checkpoint(tmp_path / "c", "cmdpi"))
    assert "query-attention" not in cmdpi.methods and cmdpi.default_method == "head-attention"
    with pytest.raises(ValueError, match="use head-attention"):
        cmdpi.explain(_image(), "Is there a fracture?", method="query-attention")


def test_cam_layer_choice(ckpt):
    """The map can be read at any backbone block's input; each block gives its own map."""
    p = Predictor.load(ckpt)
    first, last = (p.explain(_image(), "Where is the lesion?", method="rollout", layer=k) for k in (0, -1))
    assert first.shape == last.shape == (70, 90) and 0 <= first.min() and first.max() <= 1
    assert np.abs(first - last).mean() > 1e-3
    with pytest.raises(ValueError, match="blocks"):
        p.explain(_image(), "Where is the lesion?", layer=99)


def test_head_rollout_starts_two_thirds_in(ckpt):
    """head-rollout's default start is block 2L/3 (chosen on SLAKE validate), the other methods' L/3."""
    p, q = Predictor.load(ckpt), "Where is the lesion?"
    n = len(p.encoders.image.encoder.layer)
    assert 2 * n // 3 != n // 3
    own = p.explain(_image(), q, method="head-rollout")
    assert np.array_equal(own, p.explain(_image(), q, method="head-rollout", layer=2 * n // 3))
    assert not np.array_equal(own, p.explain(_image(), q, method="head-rollout", layer=n // 3))
    assert np.array_equal(p.explain(_image(), q, method="rollout"), p.explain(_image(), q, method="rollout", layer=n // 3))


def test_rollout_one_block_is_the_cls_row(ckpt):
    """Started at the last block, the rollout is I + mean_heads((∇A ⊙ A)⁺): its CLS row over the
    patches is that block's gradient-weighted attention from CLS, here computed with autograd.grad
    (unsmoothed, sigma=0)."""
    import torch

    from medvqa.explain.gradcam import ImageToLogits, eager_attention, gradient_rollout

    p = Predictor.load(ckpt)
    enc, vit = p.encoders, p.encoders.image
    t = enc.tokenize(["Where is the lesion?"])
    pooled, h = enc.encode_text(t["input_ids"], t["attention_mask"])
    w = ImageToLogits(enc, p.model, {"text_tokens": h, "text_mask": t["attention_mask"], "text_pooled": pooled,
                                     "input_ids": t["input_ids"]})
    x, last = enc.preprocess([_image().convert("RGB")]), len(vit.encoder.layer) - 1
    attn_before = vit.config._attn_implementation
    with torch.enable_grad():
        got = gradient_rollout(w, x, target=1, start=last, sigma=0)
        smoothed = gradient_rollout(w, x, target=1, start=last)
        assert vit.config._attn_implementation == attn_before     # answers keep the fused kernel
        with eager_attention(vit):
            out = vit(pixel_values=x.clone().requires_grad_(True), output_attentions=True)
            a = out.attentions[last]                                     # (1, heads, T, T)
            (g,) = torch.autograd.grad(w.head(out.last_hidden_state)[0, 1], a)
    want = (g * a).clamp(min=0).mean(1)[0, 0, 1:].detach()
    assert got.shape == (enc.grid, enc.grid)
    np.testing.assert_allclose(got.flatten(), want.numpy(), rtol=1e-4, atol=1e-7)
    from scipy.ndimage import gaussian_filter   # the default map is that grid smoothed by one patch
    np.testing.assert_allclose(smoothed, gaussian_filter(got, 1.0), rtol=1e-4, atol=1e-7)


def test_head_rollout_one_block_is_the_selected_heads_cls_row(ckpt):
    """Started at the last block, the head-selected rollout has no block before it to carry back
    through (R = I): its map is that block's ROLLOUT_HEAD attention from [CLS] over the patches."""
    import torch

    from medvqa.explain.gradcam import ROLLOUT_HEAD, ImageToLogits, eager_attention, gradient_rollout

    p = Predictor.load(ckpt)
    enc, vit = p.encoders, p.encoders.image
    w = ImageToLogits(enc, p.model, enc.question_inputs(["Where is the lesion?"]))
    x, last = enc.preprocess([_image().convert("RGB")]), len(vit.encoder.layer) - 1
    with torch.enable_grad():
        got = gradient_rollout(w, x, target=1, start=last, sigma=0, readout="head")
    with torch.no_grad(), eager_attention(vit):
        a = vit(pixel_values=x, output_attentions=True).attentions[last]          # (1, heads, T, T)
    np.testing.assert_allclose(got.flatten(), a[0, ROLLOUT_HEAD, 0, 1:].numpy(), rtol=1e-5, atol=1e-7)


def test_gradient_free_head_maps_read_the_backbones_own_attention(ckpt):
    """head-attention is the selected head's [CLS] row of the last block (the eager kernel's), whatever
    the question or target; plain-head-rollout started at the last block is the same map; both read
    the cached pass and give what an uncached one gives."""
    import torch

    from medvqa.explain.gradcam import ROLLOUT_HEAD, eager_attention, explain, plain_head_rollout

    p = Predictor.load(ckpt)
    enc, vit = p.encoders, p.encoders.image
    x, last = enc.preprocess([_image().convert("RGB")]), len(vit.encoder.layer) - 1
    with torch.no_grad(), eager_attention(vit):
        out = vit(pixel_values=x, output_attentions=True, output_hidden_states=True)
    got = plain_head_rollout(enc, torch.cat(out.hidden_states), last, sigma=0)
    np.testing.assert_allclose(got.flatten(), out.attentions[last][0, ROLLOUT_HEAD, 0, 1:].numpy(), rtol=1e-5, atol=1e-7)
    a = p.explain(_image(), "Where is the lesion?", method="head-attention")
    assert np.array_equal(a, p.explain(_image(), "Is it normal?", method="head-attention", target=p.vocab.answers[-1]))
    assert np.array_equal(a, p.explain(_image(), "Is it normal?", method="plain-head-rollout", layer=last))
    uncached = explain(enc, p.model, _image().convert("RGB"), "Where is the lesion?", "plain-head-rollout", layer=0)
    cached = p.explain(_image(), "Where is the lesion?", method="plain-head-rollout", layer=0)
    np.testing.assert_allclose(cached, uncached, atol=1e-5)
    assert np.abs(cached - a).mean() > 1e-3                        # the earlier blocks' rollout moves the map


def test_explain_cli(ckpt, tmp_path, capsys):
    _image().save(tmp_path / "x.png")
    rc = main(["explain", "--checkpoint", str(ckpt), "--image", str(tmp_path / "x.png"), "--question", "Is it normal?",
               "--out", str(tmp_path / "cam.png")])
    assert rc == 0 and Image.open(tmp_path / "cam.png").size == (90, 70)
    assert np.load(tmp_path / "cam.npy").shape == (70, 90)
    assert capsys.readouterr().err.startswith("head-attention for answer")   # the model's own map by default
    p = Predictor.load(ckpt)
    rc = main(["explain", "--checkpoint", str(ckpt), "--image", str(tmp_path / "x.png"), "--question", "Is it normal?",
               "--method", "query-attention", "--target", p.vocab.answers[0], "--out", str(tmp_path / "cam2.png")])
    assert rc == 0 and "--target does not change the map" in capsys.readouterr().err


def test_pointing_game_synthetic(tmp_path):
    import json

    from medvqa.data import Record
    from medvqa.explain.pointing import center_hit, hit, pointing_cases, pointing_game, random_hit_probability

    d = tmp_path / "xmlab1"
    d.mkdir()
    Image.new("RGB", (100, 50)).save(d / "source.jpg")
    (d / "detection.json").write_text(json.dumps([{"Liver": [10, 5, 20, 10]}, {"Left Kidney": [60, 20, 10, 10]}]))
    recs = [Record("1", str(d / "source.jpg"), "Where is the liver?", "Left", "OPEN"),
            Record("2", str(d / "source.jpg"), "Is there a kidney?", "Yes", "CLOSED"),   # side-less alias
            Record("3", str(d / "source.jpg"), "What modality is this?", "CT", "OPEN")]  # names nothing
    cases = pointing_cases(recs)
    assert [c.record.qid for c in cases] == ["1", "2"]
    cam = np.zeros((50, 100), np.float32)
    cam[8, 15] = 1.0                                               # inside the liver box
    assert hit(cam, cases[0].boxes) and not hit(cam, cases[1].boxes)
    assert not center_hit(cases[0])                                # centre (50, 25) is in neither box
    assert random_hit_probability(cases[0]) == pytest.approx(200 / 5000)

    class PointsAtTheLiver:                                        # a map with its maximum in the liver box
        methods = ("gradcam", "rollout")
        default_method = "rollout"

        def explain(self, image, question, method, layer):
            return cam

    res = pointing_game({"m": PointsAtTheLiver()}, cases, methods=("gradcam", "query-attention"), layers=(3,), progress=False)
    assert res["skipped"] == [{"model": "m", "method": "query-attention"}]      # a method the model lacks
    r = res["results"][0]
    assert (res["n"], r["hits"], r["hit_rate"], res["baseline_center"]) == (2, 1, 50.0, 0.0)
    assert r["hit_rate_ci95"][0] < 50.0 < r["hit_rate_ci95"][1]
    assert r["vs_centre"] == {"only_map": 1, "only_centre": 0, "mcnemar_p": 1.0}   # one question proves nothing
    own = pointing_game({"m": PointsAtTheLiver()}, cases, layers=(3,), progress=False)["results"]
    assert [(x["method"], x["hits"]) for x in own] == [("rollout", 1)]          # no methods: the model's own map


def _folder_cases_and_second_checkpoint(tmp_path):
    """24 synthetic cases as a folder dataset under tmp_path/data, and a tiny baseline checkpoint."""
    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 24, extra=("organ", "question_type"))
    return tiny_checkpoint(tmp_path / "other", "baseline")


def test_umap_cli_two_checkpoints(ckpt, tmp_path, capsys):
    import json

    other = _folder_cases_and_second_checkpoint(tmp_path)
    rc = main(["umap", "--checkpoint", str(ckpt), "--checkpoint", str(other), "--dataset", "folder",
               "--root", str(tmp_path / "data"), "--split", "train", "--color", "organ", "--out", str(tmp_path / "u.png"), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["n"] == 24 and len(res["checkpoints"]) == 2
    for v in res["checkpoints"].values():
        assert set(v["silhouette"]) == {"question_type", "organ", "answer_type", "correct"}
        assert -1 <= v["silhouette"]["organ"] <= 1
    assert (tmp_path / "u.png").stat().st_size > 10_000


class _RegionModel:
    """A stand-in predictor whose answer confidence is the brightness of the top-left quarter."""
    methods = ("gradcam",)
    default_method = "gradcam"

    class preset:
        class encoders:
            image_size = 32

    class encoders:
        grid = 4

    def probs(self, images, questions):
        import torch

        p = torch.tensor([np.asarray(im.convert("L"), np.float32)[:16, :16].mean() / 255 for im in images])
        return torch.stack([p, 1 - p], 1)


def test_deletion_insertion_rewards_the_right_map():
    from medvqa.explain.faithfulness import curves

    a = np.zeros((32, 32), np.uint8)
    a[:16, :16] = 255
    cam = np.zeros((32, 32), np.float32)
    cam[:16, :16] = 1.0
    r = curves(_RegionModel(), Image.fromarray(a), "q", cam, steps=8)
    assert r["deletion"] < r["deletion_random"] and r["insertion"] > r["insertion_random"]


def test_random_order_at_the_maps_patch_resolution():
    """The random control removes whole patches of the map's grid: every pixel of a patch is ranked
    next to the others of that patch, and every pixel is ranked once."""
    from medvqa.explain.faithfulness import random_patch_order

    order = random_patch_order(32, 4, np.random.default_rng(0))                 # 4×4 patches of 8×8 pixels
    assert sorted(order.tolist()) == list(range(32 * 32))
    patch_of = lambda i: (i // 32 // 8, i % 32 // 8)                            # noqa: E731
    runs = [{patch_of(i) for i in order[k:k + 64]} for k in range(0, 32 * 32, 64)]
    assert all(len(r) == 1 for r in runs) and len({next(iter(r)) for r in runs}) == 16
    assert [patch_of(i) for i in order[::64]] != sorted(patch_of(i) for i in order[::64])   # not raster order


def test_deletion_insertion_interval_of_the_paired_difference(tmp_path):
    """Over several questions the map-minus-random interval sits wholly below 0 for deletion and above 0
    for insertion when the map marks what the model reads."""
    from medvqa.data import Record
    from medvqa.explain.faithfulness import deletion_insertion

    class Reader(_RegionModel):
        def explain(self, image, question, method):
            cam = np.zeros((32, 32), np.float32)
            cam[:16, :16] = 1.0
            return cam

    recs = []
    for i in range(6):
        a = np.full((32, 32), 20 * i, np.uint8)
        a[:16, :16] = 255 - 10 * i
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        recs.append(Record(str(i), str(tmp_path / f"{i}.png"), "q", "x", "OPEN"))
    r = deletion_insertion({"m": Reader()}, recs, steps=8, progress=False)["results"][0]
    assert r["deletion_vs_random_ci95"][1] < 0 < r["insertion_vs_random_ci95"][0]


def test_faithfulness_cli(ckpt, tmp_path, capsys):
    import json

    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "data", 8)
    rc = main(["faithfulness", "--checkpoint", str(ckpt), "--dataset", "folder", "--root", str(tmp_path / "data"),
               "--split", "train", "--limit", "2", "--steps", "4", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["n"] == 2
    r = res["results"][0]
    assert {"deletion_auc", "insertion_auc", "deletion_random_auc", "insertion_random_auc"} <= set(r)
    assert all(0 <= r[k] <= 1 for k in r if k.endswith("_auc"))
    assert all(r[k][0] <= r[k][1] for k in ("deletion_vs_random_ci95", "insertion_vs_random_ci95"))


def test_figures_cli_writes_every_file(ckpt, tmp_path, capsys):
    import json

    other = _folder_cases_and_second_checkpoint(tmp_path)
    rc = main(["figures", "--checkpoint", str(ckpt), "--checkpoint", str(other), "--dataset", "folder",
               "--root", str(tmp_path / "data"), "--split", "train", "--out", str(tmp_path / "fig"),
               "--cam-cases", "2", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(res["files"]) == {"accuracy", "by_organ", "by_question_type", "reliability", "cam_grid", "umap"}
    for paths in res["files"].values():
        for p in paths:
            assert os.path.getsize(p) > 100, p
    assert "\\begin{tabular}" in (tmp_path / "fig" / "accuracy.tex").read_text()
    assert "95 % interval" in (tmp_path / "fig" / "accuracy.md").read_text()
    assert len(res["accuracy"]) == 2


def test_nearest_training_cases(ckpt, tmp_path, monkeypatch):
    from medvqa.explain.neighbours import build_index, load_or_build_index
    from tests.helpers import make_cases, make_cases_csv

    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    p = Predictor.load(ckpt)
    recs = make_cases(tmp_path / "data", 12)
    index = build_index(p, recs, progress=False)
    assert index["features"].shape[0] == 12
    r = recs[3]
    near = p.nearest(r.image, r.question, index, k=3)
    assert len(near) == 3 and near[0]["qid"] == r.qid and near[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert near[0]["similarity"] >= near[1]["similarity"] >= near[2]["similarity"]
    make_cases_csv(tmp_path / "data", 12)
    a = load_or_build_index(p, "folder", tmp_path / "data", "train", progress=False)
    b = load_or_build_index(p, "folder", tmp_path / "data", "train", progress=False)   # from the cache
    assert np.allclose(a["features"], b["features"]) and a["records"] == b["records"]


def test_captioned_map_has_its_caption_and_colour_bar():
    """The figure the app shows and the review stores: caption strip on top, the blended map, and a
    colour bar on the right running from the colormap's 1 (top) to its 0 (bottom)."""
    import matplotlib

    from medvqa.explain import captioned

    im = Image.new("RGB", (120, 100), (128, 128, 128))
    cam = np.zeros((100, 120), np.float32)
    fig = np.asarray(captioned(im, "rollout for predicted answer 'liver'", cam, opacity=1.0))
    H, W, _ = fig.shape
    top = H - 100
    assert top > 0 and W > 120
    assert (fig[:top] < 128).any()                                         # the caption is written
    blue = (np.array(matplotlib.colormaps["jet"](0.0)[:3]) * 255).astype(int)
    assert np.abs(fig[top + 50, 60].astype(int) - blue).max() <= 1         # map value 0 everywhere
    bar = fig[top:, 120:].astype(int)
    red = (np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255).astype(int)
    assert (np.abs(bar[:3] - red).max(-1) <= 2).any() and (np.abs(bar[-3:] - blue).max(-1) <= 2).any()
    assert np.asarray(captioned(im, "heatmap off")).shape[1] == 120       # no map: no colour bar


def test_an_outlier_token_is_found_and_no_relevance_flows_through_it():
    """A synthetic 4×4 token grid with one high-norm token (a register-like artefact): it is the only
    outlier, and although every query attends mostly to it, the rollout gives it no relevance beyond
    its own identity term while the rest of the grid keeps theirs."""
    import torch

    from medvqa.explain.gradcam import outlier_tokens, relevance

    torch.manual_seed(0)
    T, art = 1 + 16, 1 + 9                                   # [CLS] + 16 patches; patch 9 is the artefact
    tokens = torch.randn(1, T, 8)
    tokens[0, art] *= 30
    assert outlier_tokens(tokens[0, 1:]).nonzero().flatten().tolist() == [art - 1]
    attn = torch.full((1, 2, T, T), 0.2 / (T - 1))           # (1, heads, T, T), rows sum to 1
    attn[..., art] = 0.8 + 0.2 / (T - 1)
    attn = attn / attn.sum(-1, keepdim=True)
    grads = torch.ones_like(attn)
    R = relevance([attn, attn], [grads, grads], [tokens, tokens])
    assert R[0, art] == 0 and (R[0, 1:art] > 0).all() and (R[0, art + 1:] > 0).all()
    plain = tokens.clone()
    plain[0, art] /= 30                                       # the same grid without the artefact
    assert relevance([attn], [grads], [plain])[0, art] > 0.5   # then the attention to it counts
