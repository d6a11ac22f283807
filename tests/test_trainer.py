import json

import torch

from medvqa.models.registry import build
from medvqa.train.checkpoint import load_checkpoint
from medvqa.train.trainer import Callbacks, fit
from tests.helpers import tiny_data


def _setup(tmp_path, epochs=2):
    preset, enc, recs, vocab, ds, av = tiny_data(tmp_path)
    preset.train.epochs, preset.train.batch_size = epochs, 4
    cfg = {"model": "cmi-mtl", "preset": preset.to_dict(), "answers": vocab.answers, "ahead_vocab": av}
    return preset, ds, av, vocab, cfg


def test_fit_logs_checkpoints_and_resumes(tmp_path):
    preset, ds, av, vocab, cfg = _setup(tmp_path)
    torch.manual_seed(0)
    model = build("cmi-mtl", preset, len(vocab), ahead_vocab=av)
    fit(model, ds, ds, preset.train, tmp_path / "run", cfg)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert {"train_cls", "train_vtc", "train_aux", "val_overall"} <= set(lines[0])
    load_checkpoint(tmp_path / "run" / "best")
    # Resume: asking for 3 epochs continues from epoch 2, not from scratch.
    preset.train.epochs = 3
    model2 = build("cmi-mtl", preset, len(vocab), ahead_vocab=av)
    res2 = fit(model2, ds, ds, preset.train, tmp_path / "run", cfg)
    assert [h["epoch"] for h in res2.history] == [1, 2, 3]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3
    # A fresh run (no resume) in the same folder starts a fresh log.
    preset.train.epochs = 1
    fit(build("cmi-mtl", preset, len(vocab), ahead_vocab=av), ds, ds, preset.train, tmp_path / "run", cfg, resume=False)
    assert [json.loads(l)["epoch"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]


def test_cancel_keeps_previous_checkpoint(tmp_path):
    preset, ds, av, vocab, cfg = _setup(tmp_path, epochs=1)
    model = build("baseline", preset, len(vocab))
    fit(model, ds, ds, preset.train, tmp_path / "run", {**cfg, "model": "baseline"})
    before = (tmp_path / "run" / "best" / "model.safetensors").read_bytes()
    preset.train.epochs = 5
    steps = []
    res = fit(build("baseline", preset, len(vocab)), ds, ds, preset.train, tmp_path / "run2",
              {**cfg, "model": "baseline"}, Callbacks(on_step=lambda s, t, l: steps.append(s),
                                                   should_stop=lambda: len(steps) >= 2))
    assert res.cancelled and len(steps) == 2 and not (tmp_path / "run2" / "best").exists()
    assert (tmp_path / "run" / "best" / "model.safetensors").read_bytes() == before


def test_pretrained_parameters_take_their_own_lr():
    """Parameters a model marks as pretrained (trained backbone blocks) get lr_pretrained, the rest
    lr; biases and norms get no weight decay in either."""
    from medvqa.config import TrainConfig
    from medvqa.train.trainer import _param_groups

    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m.pretrained_prefixes = ("1.",)
    cfg = TrainConfig(lr=1e-3, lr_pretrained=1e-5, weight_decay=0.1)
    groups = _param_groups(m, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m[0].weight)]["weight_decay"] == 0.1 and "lr" not in by_id[id(m[0].weight)]
    assert by_id[id(m[0].bias)]["weight_decay"] == 0.0 and "lr" not in by_id[id(m[0].bias)]
    assert by_id[id(m[1].weight)]["lr"] == 1e-5 and by_id[id(m[1].weight)]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-5, 1e-3, 1e-3]
