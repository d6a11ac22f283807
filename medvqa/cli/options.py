"""The `train` / `pretrain` flags that override a preset: one entry per config dataclass field.

A flag's type is its field's (a bool field takes on/off) and its default is None, so "given" is
`is not None` and an unset flag leaves the preset's value. Each model's flags sit in an argument
group named after it; a model's flag given to another model is refused in one line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from medvqa.cli.common import UserError, seed_ok

MODEL = "model"   # the section of the chosen model: cmi_mtl, cmdpi or baseline
SECTIONS = {"cmi-mtl": "cmi_mtl", "cmdpi": "cmdpi", "baseline": "baseline"}


@dataclass(frozen=True)
class Option:
    field: str                                  # the config dataclass field it sets
    help: str
    flag: str = ""                              # default: --field-name
    choices: tuple = ()
    check: Callable | None = None               # (value, preset) -> why the value is refused, or None
    stages: tuple = ("train", "pretrain")
    type: Callable | None = None                # default: the field's own type

    @property
    def name(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")


def _positive(v, p):
    return None if v >= 1 else "use a positive count"


def _above_zero(v, p):
    return None if v > 0 else "use a value above 0"


def _at_least_zero(v, p):
    return None if v >= 0 else "use 0 or more"


def _probability(v, p):   # dropout, a decay, a fraction: 1 would drop, freeze or hold out everything
    return None if 0 <= v < 1 else "use a value in [0, 1)"


def _grid_divisor(v, p):
    from medvqa.config import image_grid

    g = image_grid(p.encoders)
    return None if v >= 1 and g % v == 0 else f"use a divisor of the {g}-patch grid side"


def _lam(v, p):
    return None if v.partition(":")[0] in ("uniform", "beta", "fixed") else "use uniform, beta:A,B or fixed:X"


# (group title, config section, the model it belongs to (None: every model), options)
GROUPS = (
    ("training", "train", None, (
        Option("epochs", "passes over the training split", check=_positive),
        Option("lr", "learning rate of the new (randomly initialised) parameters", check=_above_zero),
        Option("batch_size", "questions per step", check=_positive),
        Option("seed", "seed of the initialisation, the batch order and the held-out slice",
               check=lambda v, p: None if seed_ok(v) else "use a seed from 0 to 2**32 - 1"),
        Option("device", "cuda: AMP (bf16) on; under torchrun one GPU per rank", choices=("cpu", "cuda")),
        Option("weight_decay", "AdamW weight decay of the matrices", check=_at_least_zero),
        Option("ema", "select and save an exponential moving average of the weights with this per-step "
                      "decay, e.g. 0.995 (0: off)", check=_probability),
        Option("image_views", "augmented views cached per training image (crop, rotation, contrast)",
               check=lambda v, p: None if v >= 0 else "use 0 (off) or a positive count"),
        Option("val_fraction", "held-out slice of train for selection when the dataset has no validation "
                               "split (0: train on all of train and keep the last epoch)", check=_probability),
        Option("tune_image_blocks", "train the image backbone's top K blocks and its final norm from the cached "
                                    "input of block L-K (all: every block; paper preset: all)",
               type=str, stages=("train",)),
        Option("tune_text_blocks", "the same for the text backbone", type=str, stages=("train",)),
        Option("lr_pretrained", "learning rate of the tuned backbone blocks", check=_above_zero, stages=("train",)),
    )),
    ("options of every model", MODEL, None, (
        Option("dropout", "dropout of the model: CMI-MTL QQ-Former, AHead, classifier (the Cross-Mamba blocks have "
                          "none, the Transformer fusion of --ablate cmm has); CMDPI encoders and RecNet; "
                          "baseline MLP", check=_probability),
    )),
    ("CMI-MTL", "cmi_mtl", "cmi-mtl", (
        Option("alpha", "α, weight of L_vtc (CMCL)", check=_at_least_zero),
        Option("beta", "β, weight of L_aux (AHead)", check=_at_least_zero),
        Option("cmm_align", "how CMM brings the other stream to this one's length", choices=("attention", "pool")),
        Option("qqformer_text", "BLIP-2 shared self-attention over [queries ; question]"),
        Option("n_queries", "K learnable QQ-Former queries", flag="--queries", check=_positive),
    )),
    ("CMDPI", "cmdpi", "cmdpi", (
        Option("image_pool", "average-pool the patch grid by this factor before RecNet", check=_grid_divisor),
        Option("alpha", "α, weight of the inter-modal contrast C_inter", flag="--inter-weight", check=_at_least_zero,
               stages=("pretrain",)),
        Option("lam", "head-mixup λ: uniform, beta:A,B or fixed:X (Table 5)", check=_lam, stages=("train",)),
        Option("sim_threshold", "similar-image cosine threshold of difference reconstruction (Fig. 14)",
               check=lambda v, p: None if -1 <= v <= 1 else "use a cosine in [-1, 1]", stages=("train",)),
        Option("diff_weight", "weight of L_diff (Table 4)", check=_at_least_zero, stages=("train",)),
        Option("mix_weight", "weight of L_mix", check=_at_least_zero, stages=("train",)),
    )),
)


def dest(section: str, o: Option) -> str:
    return f"{section}.{o.field}"


def given(a, section: str, field: str):
    """The value given on the command line for a field, or None."""
    return getattr(a, f"{section}.{field}", None)


def _default(section: str, field: str) -> str:
    """The `offline` preset's value (the CLI's default preset), for the help."""
    from medvqa.config import get_preset

    p = get_preset("offline")
    if section == MODEL:
        return ", ".join(f"{m} {getattr(getattr(p, s), field)}" for m, s in SECTIONS.items())
    v = getattr(getattr(p, section), field)
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def add_options(sp, stage: str, models) -> dict:
    """Add the override flags of `stage` for `models` to parser `sp`, one argument group per model
    -> the argument groups by model name (by section, "train" or "model", for the shared ones), so that the
    flags that set no preset field (--init, --ablate, …) join the group they belong to."""
    from medvqa.config import Preset

    p, groups = Preset(name="fields"), {}
    for title, section, model, options in GROUPS:
        if model is not None and model not in models:
            continue
        g = sp.add_argument_group(f"{title} options (--model {model})" if model else title)
        groups[model or section] = g
        for o in options:
            if stage not in o.stages:
                continue
            kind = type(getattr(getattr(p, SECTIONS["baseline"] if section == MODEL else section), o.field))
            choices = ("on", "off") if kind is bool else o.choices or None
            g.add_argument(o.name, dest=dest(section, o), type=o.type or (None if kind in (bool, str) else kind),
                           choices=choices,
                           metavar=None if choices else o.name[2:].upper().replace("-", "_"),
                           help=f"{o.help} (offline preset: {_default(section, o.field)})".replace("%", "%%"))
    return groups


def apply_options(a, preset) -> None:
    """Set the preset field of every flag given; refuse a flag of another model, or a value out of range."""
    for title, section, model, options in GROUPS:
        for o in options:
            v = getattr(a, dest(section, o), None)
            if v is None:
                continue
            if model is not None and model != a.model:
                raise UserError(f"{o.name} is a {title} option: --model {a.model} does not take it")
            target = getattr(preset, SECTIONS[a.model] if section == MODEL else section)
            # inf passes every "above 0" check and overflows mid-run
            why = ("use a finite number" if isinstance(v, float) and not math.isfinite(v)
                   else o.check(v, preset) if o.check else None)
            if why:
                raise UserError(f"{o.name} {v}: {why}")
            setattr(target, o.field, v == "on" if isinstance(getattr(target, o.field), bool) else v)
