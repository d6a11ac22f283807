"""`calibrate`: the temperature T of a checkpoint's confidences (medvqa.calibration), into its config.json."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from medvqa.cli.common import UserError, print_json


def _recorded_root(cfg: dict):
    """The dataset folder the checkpoint was trained on: `root` in its config.json, else the --root of
    its training command (older checkpoints; relative to where it ran), or None."""
    if "root" in cfg:
        return Path(cfg["root"])
    argv = shlex.split(cfg.get("command", ""))
    return Path(argv[argv.index("--root") + 1]) if "--root" in argv[:-1] else None


def cmd_calibrate(a):
    """Fit T on held-out questions the checkpoint never trained on (the validation split, or its own
    held-out slice of train), or carry T over from a checkpoint of the same recipe trained with a
    held-out slice (--transfer-from); write it into the checkpoint's config.json."""
    from medvqa.calibration import describe, fit_report, gate, labels_of, write_temperature, yes_no_rows
    from medvqa.config import preset_from_dict
    from medvqa.data import dataset_splits, load_split
    from medvqa.predict import Predictor, resolve_checkpoint
    from medvqa.train.checkpoint import read_config
    from medvqa.train.data import held_out

    ckpt = resolve_checkpoint(a.checkpoint)
    cfg = read_config(ckpt)
    if a.transfer_from and a.yes_no:
        raise UserError("--yes-no fits two temperatures; --transfer-from copies the other checkpoint's: give one")
    if a.transfer_from:
        source_dir = resolve_checkpoint(a.transfer_from)
        if source_dir.resolve() == ckpt.resolve():
            raise UserError(f"--transfer-from {a.transfer_from}: the checkpoint itself; give the held-out run of its recipe")
        src = read_config(source_dir)
        if "temperature_fit" not in src:
            raise UserError(f"--transfer-from {a.transfer_from}: its temperature was not fitted on held-out questions")
        fit = src["temperature_fit"]
        source = f"transferred from {Path(a.transfer_from).name} ({src['model']} on {src['dataset']}; {src['temperature_source']})"
        fitted = {k: src[k] for k in ("temperature", "temperature_yes_no") if k in src}
        # the gate again, for a source fitted before it; a fit it already rejected carries its T = 1 and reason as they are
        entries = fitted | {"temperature_source": source} if "rejected" in fit else gate(fitted, fit, source)
        entries.pop("temperature_fit", None)   # the fit was on the source's questions: this checkpoint is no source
    else:
        dataset, root = a.dataset or cfg["dataset"], a.root or _recorded_root(cfg)
        if dataset != cfg.get("dataset", dataset):
            print(f"warning: {ckpt.name} was trained on {cfg['dataset']}; its T is fitted on {dataset}'s questions",
                  file=sys.stderr)
        if root is None or not Path(root).exists():
            raise UserError(f"give --root, the {dataset} folder" + (f" ({root} is not here)" if root else ""))
        loaded = {s: load_split(dataset, root, s) for s in ("train", "validate") if s in dataset_splits(dataset, root)}
        _, recs, name = held_out(loaded, preset_from_dict(cfg["preset"]).train)
        if not recs:
            raise UserError(f"{ckpt.name} was trained on all of train and {dataset} has no validation split: no "
                            "held-out questions; fit T on the same recipe trained with a held-out slice, then "
                            "--transfer-from it")
        p = Predictor.load(ckpt)
        logits = p.logits_records(recs, progress=not a.json)
        entries = fit_report(logits, labels_of(recs, p.vocab), f"fitted on {name} of {dataset}: {len(recs)} "
                             "questions" + (", yes/no top answers apart" if a.yes_no else ""),
                             yes_no_rows(logits, p.vocab.answers) if a.yes_no else None)
    write_temperature(ckpt, entries)
    if a.json:
        print_json(entries)
    else:
        fit = entries.get("temperature_fit")
        print(f"{ckpt}: {describe(entries)}, {entries['temperature_source']}" + (
            f"; on those questions the fitted T moves NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f}, "
            f"ECE {fit['ece_before']:.2f} -> {fit['ece_after']:.2f}" if fit else ""))
    return 0


def register(sub):
    from medvqa.data.datasets import DATASETS

    ca = sub.add_parser("calibrate", help="fit the temperature T of a checkpoint's confidences on held-out questions "
                                          "(never test) and store it in its config.json")
    ca.add_argument("--checkpoint", required=True)
    ca.add_argument("--dataset", choices=sorted(DATASETS), help="default: the checkpoint's own")
    ca.add_argument("--root", type=Path, help="default: the dataset folder the checkpoint was trained on")
    ca.add_argument("--transfer-from", metavar="CHECKPOINT",
                    help="take T from this checkpoint (the same recipe trained with a held-out slice) "
                         "instead of fitting")
    ca.add_argument("--yes-no", action="store_true",
                    help="two temperatures: one for questions whose top answer is yes or no, one for the rest")
    ca.add_argument("--json", action="store_true")
    ca.set_defaults(func=cmd_calibrate)
