import json

import pytest
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


def test_a_diverged_loss_stops_the_run_and_keeps_the_last_good_epoch(tmp_path):
    """A NaN loss in epoch 2 stops training with a DivergedError (a user error, naming the learning rate)
    before any NaN weight is selected, saved or left to resume from; epoch 1's checkpoint stays."""
    import math

    from medvqa.cli.common import USER_ERRORS
    from medvqa.train.checkpoint import load_weights
    from medvqa.train.trainer import DivergedError

    preset, ds, av, vocab, cfg = _setup(tmp_path, epochs=2)
    model = build("baseline", preset, len(vocab))
    steps_per_epoch = math.ceil(len(ds) / preset.train.batch_size)
    calls, forward = [0], model.forward

    def poisoned(batch):   # finite for epoch 1, NaN from the first step of epoch 2
        out = forward(batch)
        calls[0] += 1
        if calls[0] > steps_per_epoch and model.training:
            out["losses"] = {k: v * float("nan") for k, v in out["losses"].items()}
        return out

    model.forward = poisoned
    with pytest.raises(DivergedError, match=r"epoch 2, step .*learning rate.*best epoch before it") as e:
        fit(model, ds, ds, preset.train, tmp_path / "run", {**cfg, "model": "baseline"})
    assert isinstance(e.value, USER_ERRORS)
    st = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert st["epoch"] == 1 and all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    saved = build("baseline", preset, len(vocab))
    load_weights(saved, tmp_path / "run" / "best")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_an_overflowing_gradient_with_a_finite_loss_stops_the_run_too(tmp_path):
    from medvqa.train.trainer import DivergedError

    preset, ds, av, vocab, cfg = _setup(tmp_path, epochs=1)
    model = build("baseline", preset, len(vocab))
    next(model.parameters()).register_hook(lambda g: g * float("inf"))
    with pytest.raises(DivergedError, match=r"gradient norm became (inf|nan) at epoch 1, step 1: .*--no-resume"):
        fit(model, ds, ds, preset.train, tmp_path / "run", {**cfg, "model": "baseline"})
    assert not (tmp_path / "run" / "best").exists()


def test_a_work_folder_of_another_run_is_refused_not_resumed(tmp_path):
    """Two runs whose --out share a name share the default work folder: the second must not load the
    first's state (another model: a RuntimeError; another answer set of the same size: silently wrong)."""
    from medvqa.train.checkpoint import CheckpointError

    preset, ds, av, vocab, cfg = _setup(tmp_path, epochs=1)
    fit(build("baseline", preset, len(vocab)), ds, ds, preset.train, tmp_path / "run", {**cfg, "model": "baseline"})
    preset.train.epochs = 2
    for model, config in ((build("cmi-mtl", preset, len(vocab), ahead_vocab=av), cfg),
                          (build("baseline", preset, len(vocab)), {**cfg, "model": "baseline",
                                                                   "answers": cfg["answers"][::-1]})):
        with pytest.raises(CheckpointError, match="another run .*--no-resume"):
            fit(model, ds, ds, preset.train, tmp_path / "run", config)
    res = fit(build("baseline", preset, len(vocab)), ds, ds, preset.train, tmp_path / "run", {**cfg, "model": "baseline"})
    assert [h["epoch"] for h in res.history] == [1, 2]   # the same run resumes


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


@pytest.mark.parametrize("name", ["cmi-mtl", "cmdpi", "baseline"])
def test_weight_decay_only_on_linear_weights(tmp_path, name):
    """Decay reaches the weight matrices of linear maps and nothing else: not biases or norms, nor
    A_log, D, conv1d, the QQ-Former queries, embeddings, learned tokens, M or τ."""
    from medvqa.config import TrainConfig
    from medvqa.train.data import text_vocab
    from medvqa.train.trainer import _param_groups

    preset, enc, recs, vocab, ds, av = tiny_data(tmp_path)
    model = build(name, preset, len(vocab), ahead_vocab=av, text_vocab=text_vocab([ds]))
    groups = _param_groups(model, TrainConfig(weight_decay=0.1))
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(wd) == len(named)
    decayed = {n for n, p in named.items() if wd[id(p)] > 0}
    norms = {f"{m_name}.{n}" for m_name, m in model.named_modules() if "Norm" in type(m).__name__
             for n, _ in m.named_parameters(recurse=False)}
    never = ("bias", ".A_log", ".D", "conv1d.weight", "queries", "shared.weight", "relative_attention_bias.weight",
             ".M", "log_tau", ".pos", "mask_token", "answer_slot", "h_tilde")
    assert decayed and not [n for n in decayed if n.endswith(never) or n in norms]
    linear = {n for m_name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              for n in [f"{m_name}.weight"] if n in named and "shared" not in n}
    assert linear <= decayed                                                  # every projection is decayed
    if name == "cmi-mtl":
        assert {"qqformer.queries", "fusion.0.mamba.A_log", "fusion.0.mamba.conv1d.weight", "ahead.M",
                "ahead.t5.shared.weight"} <= set(named) - decayed
        assert "qqformer.layers.0.self_attn.in_proj_weight" in decayed
    if name == "cmdpi":
        assert {"recnet.pos", "image_encoder.mask_token"} <= set(named) - decayed
