"""Backbone fine-tuning (medvqa.train.tuning): tuned top blocks train, are stored alone, and every
reader of a checkpoint gets them through the Predictor's backbone."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from medvqa.cli import main
from medvqa.config import get_preset
from medvqa.models.encoders import Encoders
from medvqa.predict import Predictor
from medvqa.train.checkpoint import TUNED_FILE, decode_tuned, encode_tuned, fp16_where_it_holds, load_tuned
from medvqa.train.tuning import TunedBackbone, load_trained
from tests.helpers import make_cases_csv, tiny_checkpoint


def _train(tmp_path, model, *flags):
    make_cases_csv(tmp_path / "data", 16)
    ck = tmp_path / f"ck-{model}"
    rc = main(["train", "--model", model, "--preset", "tiny", "--dataset", "folder", "--root", str(tmp_path / "data"),
               "--out", str(ck), "--workdir", str(tmp_path / f"run-{model}"), "--epochs", "2", "--lr-pretrained", "1e-3",
               "--json", *flags])
    assert rc == 0
    return ck


def _cases(tmp_path):
    ims = [Image.open(tmp_path / "data" / f"img{i}.png").convert("RGB") for i in range(3)]
    return ims, ["Is there a fracture?", "Which organ is shown?", "Where is the lesion in the left lung?"]


@pytest.mark.parametrize("model", ["baseline", "cmi-mtl", "cmdpi"])
def test_tuned_blocks_train_survive_save_load_and_give_the_same_logits_through_the_predictor(tmp_path, capsys, model):
    ck = _train(tmp_path, model, "--tune-image-blocks", "1", "--tune-text-blocks", "all")
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["preset"]["train"]["tune_image_blocks"] == 1 and cfg["preset"]["train"]["tune_text_blocks"] == 2
    frozen = Encoders(get_preset("tiny").encoders).state_dict()
    tuned = load_tuned(ck, frozen)
    # Only the tuned tensors are stored: the last image block, the image's final norm, both text blocks.
    assert {k for k in frozen if k.startswith(("image.encoder.layer.1.", "image.layernorm.", "text.encoder.layer."))} \
        == set(tuned)
    changed = [k for k in tuned if not torch.equal(tuned[k], frozen[k])]
    assert any(k.startswith("image.") for k in changed) and any(k.startswith("text.") for k in changed)

    # The Predictor's backbone has them swapped in; everything below the tuned blocks is the pretrained one.
    p = Predictor.load(ck)
    sd = p.encoders.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in tuned.items())
    assert torch.equal(sd["image.encoder.layer.0.mlp.fc1.weight"], frozen["image.encoder.layer.0.mlp.fc1.weight"])
    assert p.encoders.image_key() != Encoders(get_preset("tiny").encoders).image_key()

    # The training path (cached block inputs -> tuned blocks -> model), reloaded from the checkpoint,
    # and the Predictor (the whole tuned backbone on the image) give the same logits.
    enc = Encoders(get_preset("tiny").encoders)
    trained = load_trained(ck, enc)
    assert isinstance(trained, TunedBackbone)
    ims, qs = _cases(tmp_path)
    with torch.no_grad():
        t = enc.tokenize(qs)
        batch = {"image_tokens": enc.image_states(enc.preprocess(ims), 1), "image_id": torch.arange(3),
                 "view": torch.zeros(3, dtype=torch.long), "text_tokens": enc.text_states(t["input_ids"], t["attention_mask"], 0),
                 "text_mask": t["attention_mask"], "input_ids": t["input_ids"]}
        via_training = trained(batch)["logits"]
    via_predictor = p.model(p._outputs(ims, qs)[0])["logits"]
    assert torch.allclose(via_training, via_predictor, atol=1e-5), (via_training - via_predictor).abs().max()
    # Saving the reloaded model writes the same tensors again.
    from medvqa.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "again", trained, cfg)
    again = load_tuned(tmp_path / "again", frozen)
    assert again.keys() == tuned.keys() and all(torch.allclose(again[k], tuned[k], atol=1e-7) for k in tuned)
    # Saliency and free text read the same backbone without knowing.
    cam = p.explain(ims[0], qs[0], method="rollout")
    assert cam.shape == (48, 40)
    # Beside an untuned model, explain_many gives the tuned one its own backbone pass.
    from medvqa.predict import explain_many

    plain = Predictor.load(tiny_checkpoint(tmp_path / "plain", model))
    assert plain.backbone is not p.backbone
    both = explain_many([p, plain], ims[0], qs[0], ["rollout"] * 2)
    for m, one in zip(both, (cam, plain.explain(ims[0], qs[0], method="rollout"))):
        assert np.abs(m - one).max() < 1e-5


def test_a_checkpoint_without_tuned_blocks_loads_exactly_as_before(tmp_path, capsys):
    ck = _train(tmp_path, "baseline", "--tune-image-blocks", "0")
    assert not (ck / TUNED_FILE).exists() and load_tuned(ck, {}) is None
    p = Predictor.load(ck)
    enc = Encoders(get_preset("tiny").encoders)
    assert p.encoders.tuned == {} and p.encoders.image_key() == enc.image_key()
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in p.encoders.state_dict().items())
    old = Predictor.load(tiny_checkpoint(tmp_path, "baseline"))   # written by save_checkpoint without any tuning
    assert old.encoders is p.encoders


def test_a_tuned_block_runs_once_per_distinct_image_and_view(tmp_path):
    preset = get_preset("tiny")
    enc = Encoders(preset.encoders)
    from medvqa.models.registry import build

    tuned = TunedBackbone(build("baseline", preset, 4), enc, {"image": 1, "text": 0})
    seen = []
    tuned.image_blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    B, N = 8, enc.grid ** 2
    batch = {"image_tokens": torch.randn(B, 1 + N, 64), "image_id": torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]),
             "view": torch.tensor([0, 0, 0, 0, 1, 0, 0, 0]), "text_tokens": torch.randn(B, 5, 64),
             "text_mask": torch.ones(B, 5, dtype=torch.long), "text_pooled": torch.randn(B, 64),
             "label": torch.zeros(B, dtype=torch.long)}
    for a, b in ((0, 1), (2, 3), (6, 7)):                    # rows of one (image, view) share their tokens
        batch["image_tokens"][b] = batch["image_tokens"][a]
    out = tuned.backbone_outputs(batch)
    assert seen == [5]                                     # (0,0) (1,0) (1,1) (2,0) (3,0)
    assert torch.equal(out["image_tokens"][0], out["image_tokens"][1])
    ref = tuned.image_top(batch["image_tokens"][2:3])
    assert torch.allclose(out["image_tokens"][2], ref[0], atol=1e-6) and not torch.allclose(out["image_tokens"][4], ref[0])


def test_image_batches_hold_whole_images_and_every_row_once():
    from medvqa.train.samplers import ImageBatchSampler

    images = [f"im{i % 7}" for i in range(40)]
    s = ImageBatchSampler(images, batch_size=8, seed=3)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(40))
    for b in batches:
        assert {i for i in range(40) if images[i] in {images[j] for j in b}} == set(b)   # no image split over batches
    s.set_epoch(1)
    assert list(s) != batches


def test_block_inputs_are_cached_under_their_own_key_and_rebuild_the_output(tmp_path):
    from medvqa.data.cache import FeatureCache
    from tests.helpers import make_cases

    enc = Encoders(get_preset("tiny").encoders)
    paths = sorted({r.image for r in make_cases(tmp_path / "imgs", 6)})
    cache = FeatureCache(enc, root=tmp_path / "cache", progress=False)
    out, inp = cache.images(paths), cache.images(paths, start=1)
    assert (tmp_path / "cache" / enc.image_key(1)).is_dir() and enc.image_key(1) != enc.image_key()
    with torch.no_grad():
        h = torch.stack([inp[p]["tokens"].float() for p in paths])
        rebuilt = enc.final_norm("image")(enc.blocks("image")[1](h))
    assert torch.allclose(rebuilt, torch.stack([out[p]["tokens"].float() for p in paths]), atol=2e-2)
    q = cache.questions(["Is there a fracture?"], start=1)["Is there a fracture?"]
    assert "pooled" not in q and q["tokens"].shape[0] == len(q["input_ids"])
    base = enc.image_key()
    enc.load_tuned({k: v for k, v in enc.state_dict().items() if k.startswith("image.encoder.layer.1.")})
    assert enc.tuned["image"][0] == 1 and enc.image_key() != base and enc.image_key(1) == f"{base}-block1"
    with pytest.raises(ValueError):
        enc.image_key(2)        # the input of block 2 depends on the tuned block 1


def test_fp16_is_kept_only_where_it_holds():
    w = torch.randn(64, 64) * 0.02
    assert fp16_where_it_holds(w).dtype == torch.float16
    assert fp16_where_it_holds(torch.full((384,), 1e-6)).dtype == torch.float32       # a layer-scale near 0
    assert fp16_where_it_holds(torch.tensor([1e5, 1.0])).dtype == torch.float32       # past float16's range


def test_a_small_change_of_a_matrix_is_stored_as_an_8_bit_difference_more_exact_than_float16():
    torch.manual_seed(0)
    base = {"w": torch.randn(64, 32) * 0.05, "b": torch.randn(32)}
    near = {"w": base["w"] + 1e-3 * torch.randn(64, 32), "b": base["b"] + 0.01}      # a few epochs at lr 2e-5
    stored = encode_tuned(near, base)
    assert stored["w.delta_q"].dtype == torch.int8 and "w" not in stored and stored["b"].dtype == torch.float16
    back = decode_tuned(stored, base)
    assert (back["w"] - near["w"]).abs().max() <= (near["w"].half().float() - near["w"]).abs().max()
    far = {"w": torch.randn(64, 32) * 0.05}                                          # unrelated to the base
    assert encode_tuned(far, base)["w"].dtype == torch.float16 and torch.allclose(
        decode_tuned(encode_tuned(far, base), base)["w"], far["w"], atol=1e-4)


def test_a_bad_block_count_is_one_line_and_exit_2(tmp_path, capsys):
    make_cases_csv(tmp_path / "data", 16)
    rc = main(["train", "--model", "baseline", "--preset", "tiny", "--dataset", "folder", "--root", str(tmp_path / "data"),
               "--out", str(tmp_path / "ck"), "--tune-image-blocks", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--tune-image-blocks 3" in err
