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


def test_ema_is_what_is_selected_saved_and_resumed(tmp_path):
    """With cfg.ema the best checkpoint holds the weight average, training keeps the live weights,
    and a resumed run carries the average on instead of restarting it."""
    from medvqa.train.checkpoint import load_weights
    from medvqa.train.trainer import WeightEMA

    m = torch.nn.Linear(2, 2)
    ema = WeightEMA(m, 0.5)
    live = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)  # n = 1: decay min(0.5, 2 / 11)
    d = 2 / 11
    assert torch.allclose(ema.shadow["weight"], d * live + (1 - d) * (live + 1))
    with ema.applied(m):
        assert torch.equal(m.weight, ema.shadow["weight"])
    assert torch.equal(m.weight, live + 1)  # the live weights come back

    preset, ds, av, vocab, cfg = _setup(tmp_path, epochs=1)
    preset.train.ema = 0.9
    model = build("baseline", preset, len(vocab))
    fit(model, ds, ds, preset.train, tmp_path / "run", {**cfg, "model": "baseline"})
    st = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    saved = build("baseline", preset, len(vocab))
    load_weights(saved, tmp_path / "run" / "best")
    k = next(k for k in st["ema"]["shadow"] if k.endswith("weight"))
    assert torch.allclose(saved.state_dict()[k], st["ema"]["shadow"][k], atol=1e-3)  # fp16 on disk at most
    assert not torch.allclose(st["model"][k], st["ema"]["shadow"][k])
    preset.train.epochs = 2
    fit(build("baseline", preset, len(vocab)), ds, ds, preset.train, tmp_path / "run", {**cfg, "model": "baseline"})
    st2 = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert st2["ema"]["n"] == 2 * st["ema"]["n"]
