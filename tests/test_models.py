import dataclasses

import pytest
import torch

from medvqa.models.cmi_mtl import ABLATIONS, CrossMambaBlock
from medvqa.models.registry import build
from medvqa.train.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import batch_of, tiny_checkpoint, tiny_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("tiny"))


def _step(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    out = model(batch)
    loss = sum(model.loss_weights.get(k, 1) * v for k, v in out["losses"].items())
    opt.zero_grad()
    loss.backward()
    opt.step()
    return out


def test_cmi_mtl_forward_losses_and_grads(data):
    preset, enc, recs, vocab, ds, av = data
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av)
    batch = batch_of(ds)
    out = _step(model, batch)
    assert out["logits"].shape == (8, len(vocab))
    assert set(out["losses"]) == {"cls", "vtc", "aux"}
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert model.ahead.M.grad is not None and model.ahead.M.grad.abs().sum() > 0   # the mask M learns
    assert model.log_tau.grad is not None                                           # τ learns


@pytest.mark.parametrize("off", ABLATIONS)
def test_each_ablation_builds_and_trains(data, off):
    preset, enc, recs, vocab, ds, av = data
    preset.cmi_mtl.ablate = (off,)
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av)
    out = _step(model, batch_of(ds))
    expected = {"cls", "vtc", "aux"} - {"cmcl": {"vtc"}, "ahead": {"aux"}}.get(off, set())
    assert set(out["losses"]) == expected
    if off == "cmm":
        assert not any(isinstance(m, CrossMambaBlock) for m in model.modules())
    if off == "qqformer":  # the fusion sees the pooled grid, ≈K tokens + CLS, not all patches
        z = model.forward_features(batch_of(ds))["x_seq"].shape[1] - batch_of(ds)["text_tokens"].shape[1]
        assert z == 1 + model.pool_size ** 2 < batch_of(ds)["image_tokens"].shape[1]
    from medvqa.explain import supports   # the query-attention map reads the QQ-Former
    assert model.has_query_attention == supports(model, "query-attention") == (off != "qqformer")
    preset.cmi_mtl.ablate = ()


def test_pool_patch_grid_keeps_cls_and_averages_the_grid():
    from medvqa.models.encoders import pool_patch_grid

    tok = torch.randn(2, 1 + 8 * 8, 5)                                               # CLS + 8×8 grid
    out = pool_patch_grid(tok, 4)
    assert out.shape == (2, 1 + 16, 5) and torch.equal(out[:, 0], tok[:, 0])
    grid = tok[:, 1:].reshape(2, 8, 8, 5)
    assert torch.allclose(out[:, 1], grid[:, :2, :2].mean((1, 2)), atol=1e-6)     # top-left 2×2 block
    assert torch.equal(pool_patch_grid(tok, 8), tok)


def test_cmm_is_trained_and_saved(data, tmp_path):
    """The public code re-creates its Mamba with random weights each forward; ours learns and persists."""
    preset, enc, recs, vocab, ds, av = data
    torch.manual_seed(0)
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av)
    before = {k: v.clone() for k, v in model.fusion.state_dict().items()}
    _step(model, batch_of(ds))
    after = model.fusion.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("mamba.in_proj" in k for k in changed) and any("mamba.A_log" in k for k in changed)
    save_checkpoint(tmp_path / "ck", model, {"model": "cmi-mtl", "preset": preset.to_dict(),
                                             "answers": vocab.answers, "ahead_vocab": av})
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    for k, v in loaded.fusion.state_dict().items():
        assert torch.equal(v, after[k])


@pytest.mark.parametrize("name", ["cmi-mtl", "cmdpi", "baseline"])
def test_save_load_identical_logits(tmp_path, name):
    ck = tiny_checkpoint(tmp_path, name)
    preset, enc, recs, vocab, ds, av = tiny_data(tmp_path)
    m1, cfg, _ = load_checkpoint(ck)
    m2, _, _ = load_checkpoint(ck)
    b = batch_of(ds)
    with torch.no_grad():
        assert torch.equal(m1(b)["logits"], m2(b)["logits"])
    assert cfg["stored_dtype"] == "float32"


def test_cmi_mtl_eval_mode_has_no_aux_losses_and_generates(data):
    preset, enc, recs, vocab, ds, av = data
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av).eval()
    b = batch_of(ds)
    with torch.no_grad():
        out = model(b)
    assert set(out["losses"]) == {"cls"}
    ids = model.generate(b)
    assert ids.shape[0] == 8 and ids.dtype == torch.long


def test_cmcl_masks_same_image_and_same_text_pairs(data):
    preset, enc, recs, vocab, ds, av = data
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av)
    z, t = torch.randn(4, 8, 64), torch.randn(4, 64)
    distinct, pair = torch.arange(4), torch.tensor([0, 0, 1, 2])
    l_plain = model.cmcl_loss(z, t, distinct, distinct)
    # rows 0 and 1: two questions on one image, or one question text on two images; neither is a negative
    l_image = model.cmcl_loss(z, t, pair, distinct)
    l_text = model.cmcl_loss(z, t, distinct, pair)
    assert torch.isfinite(l_text) and not torch.isclose(l_text, l_plain)
    assert torch.equal(l_image, l_text)   # the same pair masked, whichever side they share


@pytest.mark.parametrize("name", ["cmi-mtl", "cmdpi", "baseline"])
def test_answer_ignores_question_padding(tmp_path, name):
    """x^f and the logits must not change when the questions are padded further with arbitrary token
    states: a batched eval answers as the app's single question does (CMDPI's answer slot once took its
    position from the batch's padded length)."""
    model, _, _ = load_checkpoint(tiny_checkpoint(tmp_path, name))
    batch = batch_of(tiny_data(tmp_path)[4])
    longer = dict(batch)
    B, _, D = batch["text_tokens"].shape
    torch.manual_seed(0)
    longer["text_tokens"] = torch.cat([batch["text_tokens"], torch.randn(B, 3, D)], 1)
    longer["text_mask"] = torch.cat([batch["text_mask"], torch.zeros(B, 3, dtype=batch["text_mask"].dtype)], 1)
    longer["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(B, 3, dtype=batch["input_ids"].dtype)], 1)
    with torch.no_grad():
        a, b = model(batch), model(longer)
    torch.testing.assert_close(a["fused"], b["fused"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["logits"], b["logits"], atol=1e-5, rtol=1e-5)


def test_cmi_mtl_classifier_starts_at_the_prior(data):
    """Every answer's sigmoid starts near 1/C, so the summed BCE starts near 1 + log C, not C·log 2."""
    preset, enc, recs, vocab, ds, av = data
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av).eval()
    with torch.no_grad():
        p = model(batch_of(ds))["logits"].sigmoid()
    C = len(vocab)
    assert abs(p.mean().item() - 1 / C) < 0.25 / C


def test_build_refuses_a_misspelt_keyword(data):
    preset, enc, recs, vocab, ds, av = data
    with pytest.raises(TypeError, match="ahead_vocb"):
        build("cmi-mtl", preset, len(vocab), ahead_vocb=av)
    assert build("baseline", preset, len(vocab), ahead_vocab=av, text_vocab=[0, 1]).has_query_attention


def _cmcl_pairs(B=8, N=1 + 64, L=6, D=64, seed=0):
    """B distinct (image, question) pairs of random tiny-width tokens, one question per image, no open answer."""
    g = torch.Generator().manual_seed(seed)
    return {"image_tokens": torch.randn(B, N, D, generator=g), "text_tokens": torch.randn(B, L, D, generator=g),
            "text_mask": torch.ones(B, L, dtype=torch.long), "label": torch.zeros(B, dtype=torch.long),
            "image_id": torch.arange(B), "text_id": torch.arange(B), "is_open": torch.zeros(B, dtype=torch.bool),
            "answer_ids": torch.zeros(B, 1, dtype=torch.long)}


def test_cmcl_positives_need_the_image(data):
    """Trained on L_vtc alone, CMCL must align image and question: with the images of the batch
    permuted, the positives' similarity falls at least halfway to the negatives'. (When z came from
    the question-aware queries, the loss was solved by copying the question into z and the
    positives stayed as similar with another image.)"""
    preset, enc, recs, vocab, ds, av = data
    p = dataclasses.replace(preset, cmi_mtl=dataclasses.replace(preset.cmi_mtl, dropout=0.0))
    torch.manual_seed(0)
    model = build("cmi-mtl", p, len(vocab), ahead_vocab=av)
    batch = _cmcl_pairs()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = model(batch)["losses"]["vtc"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sim(b):  # CMCL's z exists in training only; without dropout the pass is deterministic
        with torch.no_grad():
            f = model.forward_features(b)
            return model.cmcl_logits(f["z_fvta"], f["t_fvta"])                       # (B, B)

    s = sim(batch)
    pos, neg = s.diag().mean(), s[~torch.eye(len(s), dtype=torch.bool)].mean()
    swapped = sim({**batch, "image_tokens": batch["image_tokens"].roll(1, 0)}).diag().mean()
    assert pos > neg + 1.0                                                      # the loss was learnt
    assert swapped < (pos + neg) / 2, (pos.item(), swapped.item(), neg.item())


def test_ahead_mask_weights_keep_their_position_meaning(data):
    """M_t[j] scales question token j and M_z[k] image token k whatever the batch's padded length
    (position-indexed, M scaled the queries by weights that moved with the padding)."""
    preset, enc, recs, vocab, ds, av = data
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av).eval()
    with torch.no_grad():
        model.ahead.M.uniform_(0.5, 1.5)
        batch = batch_of(ds)
        B, L, D = batch["text_tokens"].shape
        longer = {**batch, "text_tokens": torch.cat([batch["text_tokens"], torch.randn(B, 3, D)], 1),
                  "text_mask": torch.cat([batch["text_mask"], torch.zeros(B, 3, dtype=torch.long)], 1)}
        emb, att = model.ahead._inputs(*(model.forward_features(batch)[k] for k in ("x_seq", "seq_pad")))
        emb2, att2 = model.ahead._inputs(*(model.forward_features(longer)[k] for k in ("x_seq", "seq_pad")))
    K = preset.cmi_mtl.n_queries
    assert emb2.shape[1] == emb.shape[1] + 3 and torch.equal(att2[:, L:L + 3], torch.zeros(B, 3, dtype=att2.dtype))
    real = att.bool()
    torch.testing.assert_close(emb[:, :L][real[:, :L]], emb2[:, :L][real[:, :L]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[:, L:], emb2[:, L + 3:], atol=1e-5, rtol=1e-5)      # the K image tokens
    assert emb.shape[1] == L + K


@pytest.mark.parametrize("name", ["cmi-mtl", "cmdpi", "baseline"])
def test_forward_is_forward_features_then_forward_head(tmp_path, name):
    """One path for every model: logits = forward_head(forward_features(batch)["fused"]), and the
    `fused` the Predictor indexes (nearest cases, UMAP) is that same vector."""
    model, _, _ = load_checkpoint(tiny_checkpoint(tmp_path, name))
    b = batch_of(tiny_data(tmp_path)[4])
    with torch.no_grad():
        out, fused = model(b), model.forward_features(b)["fused"]
        assert torch.equal(out["fused"], fused) and torch.equal(out["logits"], model.forward_head(fused))


def test_unimodal_queries_ride_the_same_pass(data):
    """The image-only queries CMCL reads are those of a QQ-Former pass without the question, and the
    question-aware queries are unchanged by their company (one pass, block mask)."""
    preset, enc, recs, vocab, ds, av = data
    p = dataclasses.replace(preset, cmi_mtl=dataclasses.replace(preset.cmi_mtl, qqformer_layers=2))
    qq = build("cmi-mtl", p, len(vocab), ahead_vocab=av).qqformer.eval()
    b = _cmcl_pairs()
    v, t = b["image_tokens"], b["text_tokens"]
    t_pad = torch.zeros(t.shape[:2], dtype=torch.bool)
    t_pad[:3, -2:] = True                                                          # some question padding
    with torch.no_grad():
        z, z_v = qq(v, t, t_pad, unimodal=True)
        torch.testing.assert_close(z, qq(v, t, t_pad), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z_v, qq(v, None, None), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z_v, qq(v, t.flip(0), t_pad.flip(0), unimodal=True)[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z, z_v, atol=1e-3)
