"""CMDPI on the tiny preset: every loss term, where gradients flow, masking, group sampling,
no mixing at inference, checkpoint round trip, the captions corpus."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from helpers import batch_of, tiny_data
from medvqa.data.captions import pseudo_captions, read_captions_jsonl
from medvqa.data.cache import FeatureCache
from medvqa.models.cmdpi import ABLATIONS, contra, random_mask
from medvqa.models.registry import build
from medvqa.train.data import attach_pixels, pixel_size, similar_images, text_vocab
from medvqa.train.samplers import GroupBatchSampler


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmdpi")
    preset, enc, recs, vocab, ds, _ = tiny_data(tmp)
    attach_pixels(ds, FeatureCache(enc, root=tmp / "cache", progress=False), pixel_size(preset))
    return preset, ds, vocab


def _model(preset, vocab, ds, stage, ablate=()):
    preset.cmdpi.stage, preset.cmdpi.ablate = stage, tuple(ablate)
    torch.manual_seed(0)
    return build("cmdpi", preset, len(vocab), text_vocab=text_vocab([ds]))


def _caption_batch(ds, n=8):
    b = batch_of(ds, n)
    b["is_caption"][:] = True
    b["label"][:] = -1
    return b


def test_pretrain_terms_finite_and_momentum_takes_no_gradient(data):
    preset, ds, vocab = data
    m = _model(preset, vocab, ds, "pretrain").train()
    losses = m(_caption_batch(ds))["losses"]
    assert set(losses) == {"global_img", "global_txt", "local_img", "local_txt", "inter", "intra"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in m.momentum_image.parameters())
    assert all(p.grad is None for p in m.momentum_text.parameters())
    assert m.h_tilde.grad is not None and m.h_tilde.grad.abs().sum() > 0
    assert m.image_encoder.proj.weight.grad.abs().sum() > 0
    before = [p.clone() for p in m.momentum_image.parameters()]
    with torch.no_grad():
        for p in m.image_encoder.parameters():
            p.add_(1.0)
    m.momentum_update()   # θ_m moves by (1 − m) of the gap
    moved = [(q - b).abs().max().item() for q, b in zip(m.momentum_image.parameters(), before)]
    assert max(moved) == pytest.approx(1 - preset.cmdpi.momentum, rel=1e-3)


def test_vqa_rows_take_no_contrastive_loss(data):
    preset, ds, vocab = data
    m = _model(preset, vocab, ds, "pretrain").train()
    losses = m(batch_of(ds))["losses"]                       # VQA rows only
    assert "inter" not in losses and "intra" not in losses
    assert {"global_ans", "local_ans"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("off", ["global", "local", "inter", "intra"])
def test_each_pretraining_term_switches_off(data, off):
    preset, ds, vocab = data
    m = _model(preset, vocab, ds, "pretrain", [off]).train()
    losses = m(_caption_batch(ds))["losses"]
    assert not any(k.startswith(off) for k in losses)
    assert len(losses) >= 2


def test_masking_ratios():
    torch.manual_seed(0)
    valid = torch.ones(64, 100, dtype=torch.bool)
    valid[:, 60:] = False
    m = random_mask(valid, 0.75)
    assert (m.sum(1) == 45).all() and not (m & ~valid).any()
    t = random_mask(valid[:, :20], 0.15)
    assert (t.sum(1) == 3).all()
    assert (random_mask(valid[:, :3], 0.15).sum(1) == 1).all()   # at least one token per question


def test_finetune_losses_and_no_mixing_in_eval(data):
    preset, ds, vocab = data
    ds.similar = {p: [p] for p in ds.image_index}
    m = _model(preset, vocab, ds, "finetune").train()
    b = batch_of(ds)
    losses = m(b)["losses"]
    assert set(losses) == {"mix", "diff_img", "diff_txt"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.ffn_a[0].weight.grad.abs().sum() > 0 and m.ffn_i[0].weight.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        a, c = m(b)["logits"], m(b)["logits"]
    assert torch.equal(a, c)   # no random deviation or mixing at inference
    m.cfg.ablate = ("mixup", "diff")
    m.use = {k: k not in m.cfg.ablate for k in ABLATIONS}
    assert set(m.train()(b)["losses"]) == {"ans"}
    ds.similar = None


@pytest.mark.parametrize("lam", ["uniform", "beta:0.4,0.4", "fixed:0.3"])
def test_lambda_sampling(data, lam):
    preset, ds, vocab = data
    m = _model(preset, vocab, ds, "finetune")
    m.cfg.lam = lam
    x = m.sample_lambda(1000, "cpu")
    assert ((x >= 0) & (x <= 1)).all()
    if lam.startswith("fixed"):
        assert (x == 0.3).all()


def test_group_sampler_pairs_within_groups():
    groups = ["a"] * 7 + ["b"] * 4 + ["c"]
    s = GroupBatchSampler(groups, batch_size=6, pairs=True, seed=1)
    seen = Counter()
    for batch in s:
        assert len(batch) % 2 == 0
        for i, j in zip(batch[0::2], batch[1::2]):
            assert groups[i] == groups[j]
        seen.update(batch)
    assert set(seen) == set(range(len(groups)))           # every row appears each epoch
    s2 = GroupBatchSampler(["cap"] * 5 + ["vqa"] * 9, batch_size=4, pairs=False)
    for batch in s2:
        assert len({"cap" if i < 5 else "vqa" for i in batch}) == 1


def test_similar_images_threshold_and_fallback(data):
    preset, ds, vocab = data
    m = _model(preset, vocab, ds, "finetune")
    table, info = similar_images(m, ds, threshold=2.0, pretrained=True)   # nothing passes: nearest neighbour
    assert info["nearest_fallback"] == len(table) and all(len(v) == 1 and v[0] != k for k, v in table.items())
    table, info = similar_images(m, ds, threshold=-2.0, pretrained=False)
    assert all(len(v) == len(table) - 1 for v in table.values())


def test_save_load_round_trip(data, tmp_path):
    from medvqa.train.checkpoint import load_checkpoint, save_checkpoint

    preset, ds, vocab = data
    m = _model(preset, vocab, ds, "finetune").eval()
    cfg = {"model": "cmdpi", "preset": preset.to_dict(), "answers": vocab.answers, "text_vocab": text_vocab([ds])}
    save_checkpoint(tmp_path / "ck", m, cfg)
    m2, _, _ = load_checkpoint(tmp_path / "ck")
    b = batch_of(ds)
    with torch.no_grad():
        assert torch.allclose(m(b)["logits"], m2(b)["logits"], atol=1e-5)


def test_pseudo_captions_and_jsonl(tmp_path, data):
    _, ds, _ = data
    caps = pseudo_captions(ds.records)
    assert len(caps) == len(ds.image_index) and all(c.extra["caption"] for c in caps)
    with pytest.raises(ValueError):
        pseudo_captions([type(ds.records[0])(**{**ds.records[0].__dict__, "split": "test"})])
    img = ds.records[0].image
    f = tmp_path / "caps.jsonl"
    f.write_text(json.dumps({"image": img, "caption": "ct of the chest"}) + "\n{bad\n" +
                 json.dumps({"image": "missing.png", "caption": "x"}) + "\n")
    recs, problems = read_captions_jsonl(f)
    assert len(recs) == 1 and len(problems) == 2 and "line 2" in problems[0]


def test_identical_captions_are_not_each_others_negatives(data):
    """Rows with the same caption text (most pseudo-captions are a few strings) are masked out of
    C_inter's and the text half of C_intra's negatives: with one caption for every row nothing is
    left to contrast, and those terms are exactly 0; with distinct ids they are not."""
    preset, ds, vocab = data
    ids = [ds[i]["text_id"] for i in range(len(ds))]
    same_text = [(ds.records[i].question == ds.records[j].question) == (ids[i] == ids[j])
                 for i in range(len(ds)) for j in range(len(ds))]
    assert all(same_text) and len(set(ids)) < len(ids)
    m = _model(preset, vocab, ds, "pretrain", ["intra"]).train()
    b = _caption_batch(ds)
    for k in ("text_tokens", "text_mask", "input_ids"):
        b[k] = b[k][:1].expand_as(b[k]).clone()                      # every row the first row's caption
    b["text_id"][:] = b["text_id"][0]
    torch.manual_seed(0)
    assert m(b)["losses"]["inter"].item() == 0.0
    torch.manual_seed(0)
    assert m({**b, "text_id": torch.arange(len(b["text_id"]))})["losses"]["inter"].item() > 0.1
    m = _model(preset, vocab, ds, "pretrain", ["inter"]).train()
    intra = []
    for text_id in (b["text_id"], torch.arange(len(b["text_id"]))):
        torch.manual_seed(0)
        intra.append(m({**b, "text_id": text_id})["losses"]["intra"].item())
    assert intra[1] > intra[0] + 0.1                                  # the text term alone went to 0
    a, t = torch.randn(4, 8), torch.randn(4, 8)
    logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).t() / 0.1
    want = -(logits.diag() - torch.stack([logits[0, [0, 2, 3]].logsumexp(0), logits[1, [1, 2, 3]].logsumexp(0),
                                          logits[2].logsumexp(0), logits[3].logsumexp(0)])).mean()
    torch.testing.assert_close(contra(a, t, 0.1, torch.tensor([5, 5, 6, 7])), want)
