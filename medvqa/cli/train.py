"""`train`, `pretrain` and `sweep`: fitting models on the feature cache and writing checkpoint folders."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from medvqa.cli.common import Parser, UserError, check_writable, count, parse, print_json
from medvqa.cli.options import SECTIONS, add_options, apply_options, given
from medvqa.models.cmi_mtl import ABLATIONS


def _init_distributed(t):
    """Under `torchrun` (RANK/WORLD_SIZE set) join the process group: NCCL on CUDA, gloo on CPU.
    Each rank takes its own GPU (t.device becomes cuda:LOCAL_RANK); nothing here runs for a plain
    single-process launch."""
    import os

    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or dist.is_initialized():
        return
    cuda = t.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        t.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    dist.init_process_group("nccl" if cuda else "gloo")


# CMDPI sizes that must match the pretraining checkpoint a fine-tuning starts from (--init)
CMDPI_ARCH = ("d", "adapter_layers", "rec_layers", "rec_heads", "rec_ff", "image_pool", "pixel_patch")


def _workdir(a) -> Path:
    """Logs and per-epoch state (resume): --workdir, else runs/<out name>. Never overlapping --out,
    which saving replaces whole."""
    work, out = Path(a.workdir or Path("runs") / Path(a.out).name), Path(a.out)
    w, o = work.absolute(), out.absolute()
    if w == o or o in w.parents or w in o.parents:
        raise UserError(f"--out {out} overlaps the work folder {work} (logs, resume state), which saving would "
                        f"replace: give another --out or --workdir")
    return work


def _setup(a, stage: str | None = None, init_cfg: dict | None = None):
    """Preset from the flags, backbones, cached-feature data and the work folder: what train and pretrain
    share. With `init_cfg` (train --init) CMDPI's sizes come from the pretraining checkpoint."""
    import torch

    from medvqa.config import get_preset, preset_from_dict
    from medvqa.data import dataset_splits
    from medvqa.models import cmdpi
    from medvqa.models.encoders import Encoders
    from medvqa.train import tuning
    from medvqa.predict import checkpoints_dir
    from medvqa.train.checkpoint import check_out
    from medvqa.train.data import prepare

    if Path(a.out).parent == Path(".") and (checkpoints_dir() / Path(a.out).name).is_dir():
        raise UserError(f"--out {a.out}: the name of a shipped checkpoint, which this folder would shadow by name; "
                        f"give a path such as runs/ckpt/{a.out}")
    if Path(a.out).resolve().is_relative_to(checkpoints_dir().resolve()):   # saving would replace a shipped model
        raise UserError(f"--out {a.out}: inside the shipped checkpoints folder; train to another folder "
                        f"(e.g. runs/ckpt/{Path(a.out).name}) and copy the checkpoint in once it is validated")
    check_out(a.out)   # before hours of training, not at the save
    work = _workdir(a)
    known = {"cmdpi": cmdpi.STAGE_ABLATIONS.get(stage, cmdpi.ABLATIONS), "cmi-mtl": ABLATIONS}.get(a.model, ())
    bad = [x for x in a.ablate or () if x not in known]
    if bad:
        part = f"{a.model}'s {stage}" if a.model == "cmdpi" and stage else a.model
        raise UserError(f"--ablate {' '.join(bad)}: not a part of {part} "
                        + (f"(choose from {', '.join(known)})" if known else "(it has no parts to switch off)"))
    preset = get_preset(a.preset)
    t = preset.train
    apply_options(a, preset)
    if t.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    val_fraction = given(a, "train", "val_fraction")
    if val_fraction is not None and "validate" in dataset_splits(a.dataset, a.root):
        raise UserError(f"--val-fraction: {a.dataset} has its own validation split, which selection uses")
    if a.model in ("cmdpi", "cmi-mtl"):
        getattr(preset, SECTIONS[a.model]).ablate = tuple(a.ablate or ())
    if init_cfg:
        pre = init_cfg["preset"]["cmdpi"]
        pool = given(a, "cmdpi", "image_pool")
        if pool is not None and pool != pre["image_pool"]:
            raise UserError(f"--image-pool {pool}: the --init checkpoint was pretrained with {pre['image_pool']}")
        for k in CMDPI_ARCH:
            setattr(preset.cmdpi, k, pre[k])
        preset.encoders.image_size = init_cfg["preset"]["encoders"]["image_size"]
        # The pretraining learned answers (FFN_A) on every question outside its held-out slice: the fine-tuning
        # must select on that same slice, whatever its own --seed, or its validation questions were trained on.
        # It may also hold out nothing (--val-fraction 0: no selection, so nothing to leak into).
        pre_train = preset_from_dict(init_cfg["preset"]).train
        if val_fraction is None:
            t.val_fraction = pre_train.val_fraction
        elif val_fraction and val_fraction != pre_train.val_fraction:
            raise UserError(f"--val-fraction {val_fraction}: the --init checkpoint was pretrained holding out "
                            f"{pre_train.val_fraction:.0%} of train; hold out the same slice or none (0)")
        t.holdout_seed = pre_train.slice_seed
    if stage:
        preset.cmdpi.stage = stage
    _init_distributed(t)
    torch.manual_seed(t.seed)
    enc = Encoders(preset.encoders)
    for kind in tuning.KINDS:   # "all" -> a count, so that config.json says which blocks
        try:
            k = tuning.resolve_blocks(getattr(t, f"tune_{kind}_blocks"), len(enc.blocks(kind)), f"--tune-{kind}-blocks")
        except ValueError as e:
            raise UserError(str(e)) from None
        setattr(t, f"tune_{kind}_blocks", k)
    check_writable(Path(a.out))
    data = prepare(a.dataset, a.root, preset, enc, a.vocab, progress=not a.json, limit=a.limit,
                   starts=tuning.starts(enc, tuning.tuned_blocks(t)))
    return preset, enc, data, work


def _base_config(a, preset, data, model, **extra) -> dict:
    from medvqa.train.checkpoint import git_revision

    return {"model": a.model, "preset": preset.to_dict(), "dataset": a.dataset, "root": str(a.root),
            "vocab_protocol": a.vocab,
            "answers": data.vocab.answers, "ahead_vocab": data.ahead_vocab, "selection": data.selection,
            "command": "python -m medvqa " + shlex.join(a.argv), "git_revision": git_revision(),
            "n_params": sum(p.numel() for p in model.parameters()), **extra}


def _load_init(model, init: Path, quiet: bool):
    """Start from a pretrained checkpoint: every tensor whose name and shape fit; the momentum
    encoders (pretraining only) and a different answer vocabulary's last layer are left out."""
    from safetensors.torch import load_file

    own = model.state_dict()
    sd = load_file(str(Path(init) / "model.safetensors"))
    fit = {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fit, strict=False)
    left = sorted(k for k in own if k not in fit)
    if left and not quiet:
        print(f"--init: {len(fit)} tensors loaded, {len(left)} kept fresh (e.g. {left[0]})", file=sys.stderr)


def cmd_train(a):
    from medvqa.calibration import NO_HELD_OUT, describe, fit_report, labels_of, top1
    from medvqa.eval import evaluate
    from medvqa.models.registry import build
    from medvqa.train.checkpoint import read_config, save_checkpoint
    from medvqa.train.data import cmdpi_finetune_set, similar_images, text_vocab
    from medvqa.train.samplers import GroupBatchSampler, ImageBatchSampler
    from medvqa.train.trainer import dataset_logits, fit
    from medvqa.train.tuning import TunedBackbone, load_trained, tuned_blocks

    if a.init and a.model != "cmdpi":
        raise UserError(f"--init is a CMDPI option: --model {a.model} does not take it")
    init_cfg = read_config(a.init) if a.init else None
    if init_cfg and init_cfg.get("model") != "cmdpi":
        raise UserError(f"--init {a.init}: not a CMDPI pretraining checkpoint")
    preset, enc, data, work = _setup(a, stage="finetune" if a.model == "cmdpi" else None, init_cfg=init_cfg)
    t, extra, sampler, train_ds = preset.train, {}, None, data.train
    if a.model == "cmdpi":
        extra["text_vocab"] = init_cfg["text_vocab"] if init_cfg else text_vocab([data.train])
    model = build(a.model, preset, len(data.vocab), ahead_vocab=data.ahead_vocab, text_vocab=extra.get("text_vocab"))
    if a.model == "cmdpi" and a.init:
        _load_init(model, a.init, a.json)
        extra["init"] = str(a.init)
    tuned = TunedBackbone(model, enc, tuned_blocks(t)) if any(tuned_blocks(t).values()) else None
    if a.model == "cmdpi":
        c = preset.cmdpi
        similar = None
        if "diff" not in c.ablate:
            similar, extra["similar_images"] = similar_images(model, data.train, c.sim_threshold,
                                                              pretrained=bool(a.init), backbone=tuned)
        train_ds, groups = cmdpi_finetune_set(data, preset, enc, similar, progress=not a.json)
        if "mixup" not in c.ablate:
            sampler = GroupBatchSampler(groups, t.batch_size, pairs=True, seed=t.seed)
    if tuned is not None:
        model = tuned
        if sampler is None:   # whole images per batch: a tuned block runs once per image and step
            sampler = ImageBatchSampler([r.image for r in train_ds.records], t.batch_size, seed=t.seed)
    config = _base_config(a, preset, data, model, **extra)
    cb = getattr(a, "callbacks", None)   # the app's Fine-tune tab drives these
    res = fit(model, train_ds, data.val, t, work, config, resume=not a.no_resume, batch_sampler=sampler, callbacks=cb)
    if res.cancelled:  # the checkpoint folder is only ever written whole: a cancelled run leaves it as it was
        return 130
    import torch.distributed as dist

    if dist.is_initialized():  # rank 0 evaluates and writes; the others are done
        dist.barrier()
        if dist.get_rank() != 0:
            return 0
    if not (work / "best").is_dir():
        raise UserError("training stopped before the first epoch finished; nothing to save")
    best = load_trained(work / "best", enc)
    if data.val is not None:   # T on the questions selection used, which training never saw; never on test
        config.update(fit_report(dataset_logits(best, data.val), labels_of(data.val.records, data.vocab),
                                 f"fitted on {data.selection}: {len(data.val)} questions"))
    else:
        config.update(temperature=1.0, temperature_source=NO_HELD_OUT)
    metrics = {"selected_on": data.selection, "best_epoch": res.best.get("epoch"),
               "val_overall": res.best.get("val_overall"), "train_seconds": round(res.seconds, 1),
               "epochs": t.epochs, "skipped_records": len(data.problems)}
    if a.report_test and data.test is not None:   # only when asked: whatever selects a recipe must not see it
        logits, recs = dataset_logits(best, data.test), data.test.records
        preds = {x.qid: data.vocab.answers[i] for x, i in zip(recs, logits.argmax(-1).tolist())}
        conf = lambda t: {x.qid: float(c) for x, c in zip(recs, top1(logits, t)[1].tolist())}   # qid -> top-1 at T
        r = evaluate(recs, preds, conf(1.0))
        metrics["test"] = {k: r[k] for k in ("open", "closed", "overall", "n", "ece")} | {
            "ece_calibrated": evaluate(recs, preds, conf(config["temperature"]))["ece"], "oov": data.vocab.oov(recs)}
    if cb and cb.should_stop and cb.should_stop():  # cancelled after the last step, while evaluating
        return 130
    save_checkpoint(Path(a.out), best, config, metrics)
    if a.json:
        print_json(metrics)
    else:
        chosen = (f"best epoch {metrics['best_epoch']} on {data.selection}" if data.val
                  else f"epoch {metrics['best_epoch']}, the last: no validation")
        print(f"saved {a.out} ({chosen}; {res.seconds:.0f} s)\nconfidence: {describe(config)}, {config['temperature_source']}")
        if "test" in metrics:
            m = metrics["test"]
            print(f"test: open {m['open']:.2f}  closed {m['closed']:.2f}  overall {m['overall']:.2f}")
    return 0


def cmd_pretrain(a):
    """CMDPI co-regularised pretraining on the training split's questions (reconstruction) and
    captions (reconstruction + contrast): built-in pseudo-captions and/or --captions JSONL files."""
    from medvqa.data.captions import pseudo_captions, read_captions_jsonl
    from medvqa.models.registry import build
    from medvqa.train.checkpoint import save_checkpoint
    from medvqa.train.data import cmdpi_pretrain_set, text_vocab
    from medvqa.train.samplers import GroupBatchSampler
    from medvqa.train.trainer import fit

    if a.model != "cmdpi":
        raise UserError("pretrain is CMDPI's co-regularised pretraining: use --model cmdpi")
    preset, enc, data, work = _setup(a, stage="pretrain")
    captions = [] if a.no_pseudo_captions else pseudo_captions(data.train.records)
    for f in a.captions or ():
        recs, problems = read_captions_jsonl(f)
        if problems and not a.json:
            print(f"warning: {f}: {len(problems)} caption lines skipped, e.g. {problems[0]}", file=sys.stderr)
        captions += recs
    ds, groups = cmdpi_pretrain_set(data, preset, enc, captions, progress=not a.json)
    vocab_ids = text_vocab([ds])
    model = build("cmdpi", preset, len(data.vocab), text_vocab=vocab_ids)
    config = _base_config(a, preset, data, model, text_vocab=vocab_ids, n_captions=len(captions),
                          pretrain_rows=len(ds))
    t = preset.train
    res = fit(model, ds, None, t, work, config, resume=not a.no_resume,
              batch_sampler=GroupBatchSampler(groups, t.batch_size, pairs=False, seed=t.seed))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        if dist.get_rank() != 0:
            return 0
    if not res.history:
        raise UserError("pretraining stopped before the first epoch finished; nothing to save")
    last = res.history[-1]
    metrics = {"stage": "pretrain", "epochs": t.epochs, "train_seconds": round(res.seconds, 1),
               "n_captions": len(captions), "n_questions": len(data.train),
               **{k: v for k, v in last.items() if k.startswith("train_")}}
    save_checkpoint(Path(a.out), model, config, metrics)   # the last epoch: pretraining has no selection split
    if a.json:
        print_json(metrics)
    else:
        print(f"saved {a.out} ({len(captions)} captions + {len(data.train)} questions, {t.epochs} epochs, "
              f"{res.seconds:.0f} s)")
    return 0


def variant_stages(spec) -> dict:
    """A sweep variant is train arguments, or {"pretrain": [...], "train": [...]} (CMDPI)."""
    return spec if isinstance(spec, dict) else {"train": spec}


def _read_sweep_config(path: Path, root) -> dict:
    """The sweep config, checked whole before any training starts (a typo must not surface an hour in)."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read the sweep config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object with dataset, root and variants")
    missing = [k for k in ("dataset", "variants") + (() if root else ("root",)) if k not in cfg]
    if missing:
        raise UserError(f"{path}: the sweep config has no {', '.join(missing)}")
    if not isinstance(cfg["variants"], dict) or not cfg["variants"]:
        raise UserError(f"{path}: variants must be a non-empty object of name -> train arguments")

    def args_ok(x):
        return isinstance(x, list) and all(isinstance(v, str) for v in x)

    for name, spec in cfg["variants"].items():
        stages = variant_stages(spec)
        if not args_ok(stages.get("train")) or set(stages) - {"train", "pretrain"} \
                or not args_ok(stages.get("pretrain", [])):
            raise UserError(f"{path}: variant {name!r} must be a list of train arguments, "
                            'or {"pretrain": [...], "train": [...]}')
    if not args_ok(cfg.get("common", [])):
        raise UserError(f"{path}: common must be a list of arguments")
    return cfg


def cmd_sweep(a):
    """Run a config's variants with `train --report-test` (resumable: a finished variant is reused)
    and write the results as a Markdown and a CSV table."""
    import hashlib

    cfg = _read_sweep_config(a.config, a.root)
    out = Path(a.out)
    data_args = ["--dataset", cfg["dataset"], "--root", str(a.root or cfg["root"])]
    plan = []   # (variant, [(command, the checkpoint it writes)]: its pretraining if any, then its training)
    for name, spec in cfg["variants"].items():
        spec = variant_stages(spec)
        args, steps = list(spec["train"]), []
        if "pretrain" in spec:   # variants with the same pretraining arguments share one pretrained checkpoint
            pre_args = cfg.get("common", []) + spec["pretrain"]
            key = hashlib.sha1(json.dumps(pre_args).encode()).hexdigest()[:10]
            pre = out / "pretrained" / key
            steps.append((["pretrain", *data_args, "--out", str(pre),
                           "--workdir", str(out / "runs" / f"pretrain-{key}"), *pre_args], pre))
            args += ["--init", str(pre)]
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        ck = out / "checkpoints" / slug
        steps.append((["train", *data_args, "--out", str(ck), "--workdir", str(out / "runs" / slug), "--report-test",
                       *cfg.get("common", []), *args, *(a.extra or [])], ck))
        plan.append((name, steps))
    parser = _stage_parser()
    for _, steps in plan:   # every command line parses before the first training starts
        for argv, _ in steps:
            parser.parse_args(argv)
    rows = []
    for name, steps in plan:
        ck = steps[-1][1]
        for argv, done in steps:
            if not (done / "metrics.json").is_file():
                print(f"[sweep] python -m medvqa {shlex.join(argv)}", file=sys.stderr)
                ns = parse(parser, argv)
                ns.func(ns)
        m = json.loads((ck / "metrics.json").read_text())
        t = m.get("test", {})   # none: a dataset without a test split, or a checkpoint trained without --report-test
        rows.append({"variant": name, "open": t.get("open"), "closed": t.get("closed"), "overall": t.get("overall"),
                     "val_overall": m.get("val_overall"), "best_epoch": m.get("best_epoch"),
                     "train_s": m.get("train_seconds")})
        md = _write_sweep_tables(rows, out)   # after every variant, so a long sweep shows its progress
    print(md)
    return 0


def _write_sweep_tables(rows: list[dict], out: Path) -> str:
    import csv

    def cell(v, spec):   # a value a run did not produce (no test split, no validation) reads as a dash
        return "–" if v is None else format(v, spec)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = ["| variant | open | closed | overall | val overall | best epoch | train s |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | " + " | ".join(cell(r[k], ".2f") for k in ("open", "closed", "overall", "val_overall"))
           + f" | {cell(r['best_epoch'], '')} | {cell(r['train_s'], '.0f')} |" for r in rows]
    (out / "results.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


def _stage_parser() -> argparse.ArgumentParser:
    """The `train` and `pretrain` commands alone: what a sweep variant's arguments are parsed by."""
    p = Parser(prog="medvqa")
    _register_fit(p.add_subparsers(dest="cmd", required=True))
    return p


def register(sub):
    _register_fit(sub)
    sw = sub.add_parser("sweep", help="run a config of train variants (ablations) and tabulate test results")
    sw.add_argument("--config", required=True, type=Path)
    sw.add_argument("--out", required=True, type=Path)
    sw.add_argument("--root", type=Path, help="override the dataset root in the config")
    sw.add_argument("--extra", nargs=argparse.REMAINDER, help="extra train arguments for every variant")
    sw.set_defaults(func=cmd_sweep)


def _register_fit(sub):
    from medvqa.config import PRESETS
    from medvqa.data.datasets import DATASETS
    from medvqa.models.cmdpi import ABLATIONS as CMDPI_ABLATIONS
    from medvqa.models.registry import MODELS

    tr = sub.add_parser("train", help="train a model from the feature cache and save a checkpoint folder")
    pt = sub.add_parser("pretrain", help="CMDPI co-regularised pretraining (then: train --model cmdpi --init)")
    tr.add_argument("--model", required=True, choices=sorted(MODELS))
    pt.add_argument("--model", required=True, choices=["cmdpi"])
    for sp, stage, models in ((tr, "train", MODELS), (pt, "pretrain", ("cmdpi",))):
        sp.add_argument("--preset", default="offline", choices=sorted(PRESETS))
        sp.add_argument("--dataset", required=True, choices=sorted(DATASETS))
        sp.add_argument("--root", required=True, type=Path)
        sp.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
        sp.add_argument("--workdir", type=Path, help="logs, per-epoch state for resume (default runs/<out name>)")
        sp.add_argument("--vocab", choices=("all", "train"), default="all",
                        help="answer vocabulary: all splits (published protocol) or train only")
        sp.add_argument("--limit", type=count, help="use only the first N training records (smoke tests)")
        sp.add_argument("--no-resume", action="store_true", help="ignore an earlier run's state in --workdir")
        sp.add_argument("--json", action="store_true")
        groups = add_options(sp, stage, models)
        groups["model"].add_argument(
            "--ablate", nargs="*", choices=ABLATIONS + CMDPI_ABLATIONS,
            help="parts to switch off: CMI-MTL modules (Table 2) or CMDPI terms (Figs. 7–8)")
        if stage == "train":
            groups["train"].add_argument(
                "--report-test", action="store_true",
                help="also score the saved checkpoint on the test split (in metrics.json and the output); "
                     "off by default, so that choosing a recipe cannot see the test split")
            groups["cmdpi"].add_argument("--init", type=Path, help="the pretraining checkpoint to fine-tune from")
    pt.add_argument("--captions", type=Path, action="append", help="JSONL of {image, caption} (ROCO-style); repeatable")
    pt.add_argument("--no-pseudo-captions", action="store_true", help="leave out the built-in pseudo-caption corpus")
    pt.set_defaults(func=cmd_pretrain)
    tr.set_defaults(func=cmd_train)
