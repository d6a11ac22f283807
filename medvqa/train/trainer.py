"""One training loop for every model (DESIGN §10).

A model's `forward(batch)` returns `{"logits", "losses": {name: tensor}}` and carries
`loss_weights`; the trainer sums the weighted losses and owns the optimiser, warm-up + cosine
schedule, clipping, AMP (CUDA), seeding, selection on validation (without one: the last epoch), atomic checkpoints,
resume,
and callbacks (progress, cancel, live metrics) through which the app drives it.
Under `torchrun` it shards batches with a DistributedSampler and only rank 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medvqa.data import DataError
from medvqa.data.features import collate
from medvqa.train.checkpoint import CheckpointError, save_checkpoint


class DivergedError(ValueError):
    """The loss became NaN or infinite, most often a learning rate too high for the data: stop before
    such weights are selected, saved or resumed from."""


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass
class Callbacks:
    on_step: callable = None        # (step, total_steps, {loss name: value})
    on_epoch: callable = None       # (epoch, metrics dict)
    should_stop: callable = None    # () -> bool: cancel between steps


@dataclass
class FitResult:
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0


class WeightEMA:
    """Exponential moving average of the floating-point weights and buffers (Polyak averaging).
    Validation and the saved checkpoint use the average; training goes on with the live weights.
    The decay warms up as (1 + n) / (10 + n), as TensorFlow's ExponentialMovingAverage with num_updates, so the random
    init fades fast."""

    def __init__(self, model, decay: float):
        self.decay, self.n = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v, 1 - d)

    @contextmanager
    def applied(self, model):
        """Swap the average into `model` for the block, then put the live weights back."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(live, strict=False)

    def state_dict(self) -> dict:
        return {"n": self.n, "shadow": self.shadow}

    def load_state_dict(self, st: dict):
        self.n = st["n"]
        for k, v in st["shadow"].items():
            self.shadow[k].copy_(v)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _decayed(model) -> set[int]:
    """ids of the parameters weight decay applies to: the weight matrices of linear maps (nn.Linear,
    attention in-projections). Never biases, norms, embeddings (a tied T5 output layer included),
    learned tokens (QQ-Former queries, positions, [MASK]), the Mamba's A_log, D and depthwise conv1d,
    the AHead's mask M or τ: a shape rule (ndim ≥ 2) decayed A_log, conv1d, queries and embeddings."""
    mods = list(model.modules())
    lin = {id(m.weight) for m in mods if isinstance(m, torch.nn.Linear)}
    lin |= {id(m.in_proj_weight) for m in mods
            if isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None}
    return lin - {id(m.weight) for m in mods if isinstance(m, torch.nn.Embedding)}


def _param_groups(model, cfg):
    """Weight decay on the parameters `_decayed` names only; parameters whose name starts with one
    of the model's `pretrained_prefixes` (trained backbone blocks) take cfg.lr_pretrained instead of cfg.lr."""
    pre = tuple(getattr(model, "pretrained_prefixes", ()))
    decayed = _decayed(model)
    groups = {}   # (pretrained, decay) -> params; new weights first, as resumed optimiser states expect
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((bool(pre) and n.startswith(pre), id(p) in decayed), []).append(p)
    return [{"params": groups[k], "weight_decay": cfg.weight_decay if k[1] else 0.0}
            | ({"lr": cfg.lr_pretrained} if k[0] else {})
            for k in ((False, True), (False, False), (True, True), (True, False)) if k in groups]


@torch.no_grad()
def dataset_logits(model, ds, device="cpu", batch_size=64) -> torch.Tensor:
    """(N, C) answer logits of every item, in order. Every model's probabilities are one softmax over
    the answers (CMI-MTL's BCE-trained head too): medvqa.calibration scales them by the checkpoint's T."""
    model.eval()
    out = []
    for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
        batch = to_device({k: v for k, v in batch.items() if k != "label"}, device)
        out.append(model(batch)["logits"].float().cpu())
    return torch.cat(out)


def accuracy(model, ds, device="cpu") -> dict:
    from medvqa.eval import evaluate

    pred = dataset_logits(model, ds, device).argmax(-1)   # the top-1 answer, whatever the temperature
    answers = ds.vocab.answers
    return evaluate(ds.records, {r.qid: answers[i] for r, i in zip(ds.records, pred.tolist())})


def _diverged(what: str, epoch: int, step: int, cfg, out_dir: Path, res) -> DivergedError:
    kept = f"; the best epoch before it stays in {out_dir / 'best'}" if res.best else ""
    # a resumed run would bring the saved optimiser's rate back
    return DivergedError(f"{what} at epoch {epoch + 1}, step {step + 1}: lower the learning rate (it is {cfg.lr:g}) "
                         f"and start afresh (--no-resume){kept}")


def _loads(model, state: dict) -> bool:
    """Load `state` into `model` -> False if its names or shapes do not fit (the tensors that did fit may
    have been copied: the caller stops the run)."""
    try:
        model.load_state_dict(state)
    except RuntimeError:
        return False
    return True


def fit(model, train_ds, val_ds, cfg, out_dir: Path, ckpt_config: dict, callbacks: Callbacks | None = None,
        resume: bool = True, batch_sampler=None) -> FitResult:
    """batch_sampler: a model's own batching (CMDPI's group sampler), with `set_epoch` and
    torchrun sharding of its own; otherwise shuffled batches (DistributedSampler under torchrun)."""
    if train_ds is None or not len(train_ds):   # prepare() gives None when no row of train was usable
        raise DataError("no usable training cases: the training split is empty or every row of it was skipped")
    cb = callbacks or Callbacks()
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    model.to(device)
    distributed = dist.is_available() and dist.is_initialized()
    if batch_sampler is not None:
        sampler = batch_sampler
        loader = DataLoader(train_ds, batch_sampler=batch_sampler, collate_fn=collate, num_workers=cfg.num_workers)
    else:
        sampler = torch.utils.data.DistributedSampler(train_ds, seed=cfg.seed) if distributed else None
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                            collate_fn=collate, num_workers=cfg.num_workers, drop_last=len(train_ds) > cfg.batch_size,
                            generator=torch.Generator().manual_seed(cfg.seed))
    # find_unused_parameters: a batch with no open question leaves the AHead out of the graph
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if distributed else model
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.98))
    total = cfg.epochs * len(loader)
    warm = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    use_amp = cfg.amp and device.type == "cuda"
    ema = WeightEMA(model, cfg.ema) if cfg.ema > 0 else None

    state_path = out_dir / "train_state.pt"
    # what makes a work folder's state this run's: another model or answer set would not load, or load wrongly
    run = json.dumps({k: ckpt_config.get(k) for k in ("model", "dataset", "answers")})
    res, start_epoch, step = FitResult(), 0, 0
    if resume and state_path.is_file():  # our own file; weights_only refuses arbitrary pickles
        st = torch.load(state_path, map_location=device, weights_only=True)
        theirs = json.loads(st.get("run", "{}"))
        if st.get("run", run) != run or not _loads(model, st["model"]):
            raise CheckpointError(f"{out_dir}: holds the resumable state of another run"
                                  + (f" ({theirs.get('model')} on {theirs.get('dataset')})" if theirs else "")
                                  + "; give --no-resume to start over there, or another --workdir")
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, step = st["epoch"], st["step"]
        if ema is not None and "ema" in st:
            ema.load_state_dict(st["ema"])
        res.best = json.loads(st["best"])
        res.history = json.loads(st["history"])
    if is_rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
        if start_epoch == 0:  # a fresh run: an earlier run's per-epoch log would read as this one's
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        sums, counts = {}, {}
        # None: off when not a terminal
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if is_rank0() else True)
        for batch in bar:
            if cb.should_stop and cb.should_stop():
                res.cancelled = True
                break
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(batch)
            losses = out["losses"]
            loss = sum(model.loss_weights.get(k, 1.0) * v.float() for k, v in losses.items())
            finite = torch.isfinite(loss.detach()).float()
            if distributed:   # every rank stops at the same step; one alone would leave the others waiting
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not finite:
                what = (f"the loss became {loss.item()}" if not torch.isfinite(loss)
                        else "another rank's loss became non-finite")
                raise _diverged(what, epoch, step, cfg, out_dir, res)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:   # the norm is the same on every rank (gradients are averaged): all stop together
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                if not torch.isfinite(norm):   # a finite loss with an overflowing gradient would poison the step
                    raise _diverged(f"the gradient norm became {norm.item()}", epoch, step, cfg, out_dir, res)
            opt.step()
            sched.step()
            if hasattr(model, "momentum_update"):  # CMDPI's momentum encoders follow the online ones
                model.momentum_update()
            if ema is not None:
                ema.update(model)
            step += 1
            vals = {k: v.item() for k, v in losses.items()} | {"loss": loss.item()}
            for k, v in vals.items():  # a term absent from some batches (CMDPI contrast) averages over its own
                sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
            bar.set_postfix(loss=f"{vals['loss']:.3f}")
            if cb.on_step:
                cb.on_step(step, total, vals)
        if res.cancelled:
            break
        metrics = {"epoch": epoch + 1, "step": step, "lr": sched.get_last_lr()[0],
                   **{f"train_{k}": v / counts[k] for k, v in sums.items()}, "seconds": round(time.time() - t0, 1)}
        with ema.applied(model) if ema is not None else nullcontext():  # select and save the average
            if val_ds is not None and len(val_ds):
                acc = accuracy(model, val_ds, device)
                metrics.update({"val_open": acc["open"], "val_closed": acc["closed"], "val_overall": acc["overall"]})
            res.history.append(metrics)
            if is_rank0():
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                score = metrics.get("val_overall", metrics["epoch"])   # no validation: the last epoch
                if not res.best or score > res.best["score"]:
                    res.best = {"score": score, **metrics}
                    save_checkpoint(out_dir / "best", model, ckpt_config, {"selected": res.best})
        if is_rank0():
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch + 1, "step": step, "best": json.dumps(res.best), "run": run,
                        "history": json.dumps(res.history)}
                       | ({"ema": ema.state_dict()} if ema is not None else {}), tmp)
            os.replace(tmp, state_path)
        if cb.on_epoch:
            cb.on_epoch(epoch + 1, metrics)
    res.seconds = time.time() - t0
    return res
