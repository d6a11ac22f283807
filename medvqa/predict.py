"""Predictor: the one API the app, CLI and notebooks call (DESIGN §6).

    p = Predictor.load("assets/checkpoints/cmi-mtl-vqa-rad")
    p.answer(image, "Is there a fracture?", top_k=5)  # -> Answer(text, score, top_k, kind, free_text)

Models see backbone tokens only; the Predictor owns the backbones, preprocessing and batching.
Loading is lazy (backbones on first use) and cached per process.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medvqa.calibration import UNCERTAIN_BELOW, probabilities, row_temperatures, top1
from medvqa.data import AnswerVocab, ImageError, InputError, load_image
from medvqa.data.datasets import CLOSED_ANSWERS
from medvqa.encode import LRU
from medvqa.explain import DEFAULT_METHOD, METHOD_NAMES, default_method, supports
from medvqa.train.checkpoint import CheckpointError, load_checkpoint

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"


def checkpoints_dir() -> Path:
    """Where checkpoints are looked up by name ($MEDVQA_CHECKPOINTS overrides the shipped folder)."""
    return Path(os.environ.get("MEDVQA_CHECKPOINTS") or SHIPPED)
MAX_QUESTION_CHARS = 500
KEPT_OUTPUTS = 32   # head outputs kept per cached image (models × questions), a few KB each


def set_cpu_threads():
    """Use the cores we have, but no more than 4: small matmuls gain nothing past that."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def answer_kind(answer: str) -> str:
    return "closed" if answer in CLOSED_ANSWERS else "open"


@dataclass
class Answer:
    text: str
    score: float
    top_k: list = field(default_factory=list)       # [(answer, probability), …], calibrated (config.json's T)
    kind: str = "open"                              # "closed" (yes/no) | "open"
    free_text: str | None = None                    # CMI-MTL's AHead, generated for open answers (beyond the paper)

    @property
    def uncertain(self) -> bool:
        """The calibrated top-1 probability is under medvqa.calibration.UNCERTAIN_BELOW."""
        return self.score < UNCERTAIN_BELOW

    @property
    def runner_up(self) -> tuple | None:
        return self.top_k[1] if len(self.top_k) > 1 else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["answer"] = d.pop("text")
        d["top_k"] = [[a, s] for a, s in self.top_k]
        d["uncertain"] = self.uncertain
        return d


def resolve_checkpoint(name_or_dir) -> Path:
    p = Path(name_or_dir)
    if p.is_dir():
        return p
    if (checkpoints_dir() / str(name_or_dir)).is_dir():
        return checkpoints_dir() / str(name_or_dir)
    if p.is_file():
        raise CheckpointError(f"{p}: a file; a checkpoint is a folder (model.safetensors + config.json)")
    raise CheckpointError(f"{name_or_dir}: no such checkpoint folder (installed ones: "
                          f"{', '.join(sorted(x.name for x in checkpoints_dir().glob('*'))) or 'none'})")


_encoders_lock = threading.Lock()   # lru_cache does not lock: two first asks at once would build two backbones


def _encoders(enc_key: tuple, tuned_from: Path | None = None):
    """The backbones of an encoder config; with `tuned_from` (a checkpoint folder) its trained top
    blocks swapped in, so every caller of the Predictor reads the tuned backbone."""
    with _encoders_lock:
        return _build_encoders(enc_key, tuned_from)


@functools.lru_cache(maxsize=4)
def _build_encoders(enc_key: tuple, tuned_from: Path | None = None):
    from medvqa.config import EncoderConfig
    from medvqa.models.encoders import Encoders
    from medvqa.train.checkpoint import load_tuned

    with torch.inference_mode(False):  # weights made under inference mode could never serve Grad-CAM
        enc = Encoders(EncoderConfig(**dict(enc_key)))
        if tuned_from is not None:
            enc.load_tuned(load_tuned(tuned_from, enc.state_dict()))
        return enc


class Predictor:
    _cache: dict = {}
    _cache_lock = threading.Lock()   # one load at a time fills the cache of loaded checkpoints

    def __init__(self, model, config: dict, metrics: dict, path: Path):
        from medvqa.config import preset_from_dict

        self.model, self.config, self.metrics, self.path = model, config, metrics, path
        self.name = config["model"]
        self.preset = preset_from_dict(config["preset"])
        self.vocab = AnswerVocab(config["answers"])
        self.temperature = float(config.get("temperature", 1.0))   # medvqa.calibration; 1.0: never fitted

    def temperatures(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C) logits -> (N,) the calibration T of each row (two when `temperature_yes_no` was fitted)."""
        return row_temperatures(logits, self.vocab.answers, self.config)

    @classmethod
    def load(cls, name_or_dir) -> "Predictor":
        path = resolve_checkpoint(name_or_dir).resolve()
        with cls._cache_lock:
            if path not in cls._cache:
                set_cpu_threads()
                cls._cache[path] = cls(*load_checkpoint(path), path)
            return cls._cache[path]

    @property
    def encoders(self):
        from medvqa.train.checkpoint import TUNED_FILE

        tuned = self.path if (Path(self.path) / TUNED_FILE).is_file() else None
        return _encoders(tuple(sorted(asdict(self.preset.encoders).items())), tuned)

    @property
    def backbone(self):
        """The shared, cached and micro-batched backbone (medvqa.encode): one pass per image serves
        every model on it."""
        from medvqa.encode import backbone

        return backbone(self.encoders)

    # -- batched tokens ---------------------------------------------------------------------------
    def _outputs(self, images, questions) -> tuple[dict, dict]:
        """The model's input batch (the backbone's tokens, cached) and its logits and fused features.
        One image's outputs are kept in its backbone cache entry, per model and question, and leave the
        cache with it: an ask's answer, map caption and nearest cases run the head once."""
        bb = self.backbone
        entries = bb.encode(images)
        batch = {"image_tokens": torch.stack([e["tokens"] for e in entries]), **bb.question_inputs(questions)}
        kept = entries[0].setdefault("outputs", LRU(KEPT_OUTPUTS)) if len(entries) == 1 else None
        out = kept and kept.get((self, questions[0]))
        if out is None:
            out = {k: v for k, v in self.model(batch).items() if k in ("logits", "fused")}
            if kept is not None:
                kept.put((self, questions[0]), out)
        return batch, out

    def _free_text(self, batch) -> list[str | None]:
        if getattr(self.model, "use_ahead", False):
            ids = self.model.generate(batch)
            return [self.encoders.tokenizer.decode([i for i in row.tolist() if i], skip_special_tokens=True).strip()
                    for row in ids]
        return [None] * len(batch["text_mask"])

    @staticmethod
    def check_question(q) -> str:
        if q is not None and not isinstance(q, str):   # an API client's 5 or ["a"] is no question
            raise InputError(f"the question must be text, not {type(q).__name__}")
        q = (q or "").strip()
        if not q:
            raise InputError("the question is empty")
        if len(q) > MAX_QUESTION_CHARS:
            raise InputError(f"the question is too long ({len(q)} characters; at most {MAX_QUESTION_CHARS})")
        return q

    def _forward(self, images, questions, free_text: bool):
        ims = [im if hasattr(im, "mode") and im.mode == "RGB" else load_image(im) for im in images]
        qs = [self.check_question(q) for q in questions]
        free = [None] * len(qs)
        # The heads are stateless: concurrent requests run them side by side (the backbone batches them).
        with torch.inference_mode():
            batch, out = self._outputs(ims, qs)
            logits = out["logits"].float()
            # The AHead learnt from open questions only: it writes free text where the classifier's
            # answer is open, and is not asked (nor paid for) on yes/no answers.
            rows = [r for r, i in enumerate(logits.argmax(-1).tolist()) if answer_kind(self.vocab.answers[i]) == "open"]
            if free_text and rows:
                for i, text in zip(rows, self._free_text({k: v[rows] for k, v in batch.items()})):
                    free[i] = text
        return logits, free

    def probs(self, images, questions) -> torch.Tensor:
        """(B, C) the model's own answer probabilities (softmax over the vocabulary at T = 1): what
        faithfulness curves read, so that refitting T never moves a saliency score. Shown answers are calibrated."""
        return probabilities(self._forward(images, questions, free_text=False)[0])

    def answer_batch(self, images, questions, top_k: int = 5, free_text: bool = True) -> list[Answer]:
        logits, free = self._forward(images, questions, free_text)
        probs = probabilities(logits, self.temperatures(logits))         # (B, C), calibrated
        out = []
        for p, ft in zip(probs, free):
            s, i = p.topk(min(top_k, len(p)))
            top = [(self.vocab.answers[j], round(float(v), 4)) for v, j in zip(s, i.tolist())]
            out.append(Answer(top[0][0], top[0][1], top, answer_kind(top[0][0]), ft))
        return out

    def answer(self, image, question, top_k: int = 5) -> Answer:
        return self.answer_batch([image], [question], top_k)[0]

    def features(self, image, question) -> dict:
        """Named vectors for one case: the fused feature the classifier reads, and the backbones'
        global image and question vectors."""
        im, q = load_image(image), self.check_question(question)
        with torch.inference_mode():
            batch, out = self._outputs([im], [q])
            fused = out["fused"][0]
        return {"fused": fused.numpy(), "image_global": batch["image_tokens"][0, 0].numpy(),
                "question_global": batch["text_pooled"][0].numpy()}

    def nearest(self, image, question, index: dict, k: int = 5) -> list[dict]:
        """The k training cases of `index` (medvqa.explain.neighbours) nearest in this model's
        fused-feature space."""
        from medvqa.explain.neighbours import nearest

        return nearest(index, self.features(image, question)["fused"], k)

    @property
    def default_method(self) -> str:
        """The saliency method that localised best for this kind of model (medvqa.explain)."""
        m = default_method(self.config["model"])
        return m if supports(self.model, m) else DEFAULT_METHOD

    @property
    def methods(self) -> tuple[str, ...]:
        """The saliency methods this model supports (medvqa.explain.supports)."""
        return tuple(m for m in METHOD_NAMES if supports(self.model, m))

    def explain(self, image, question, method: str | None = None, target: str | int | None = None,
                layer: int | None = None):
        """Saliency map (H×W float32 in [0, 1]) for the predicted answer, or for `target` (an answer
        of the vocabulary, or its index), by `method` (default: `default_method`), read at the input
        of image-backbone block `layer` (for "rollout": the block it starts from; default:
        medvqa.explain.gradcam's choice)."""
        return explain_many([self], image, question, [method], [target], layer)[0]

    def _target(self, target: str | int | None) -> int | None:
        if isinstance(target, str):
            from medvqa.data import normalize_answer

            idx = self.vocab.encode(normalize_answer(target))
            if idx < 0:
                raise InputError(f"{target!r} is not an answer this model can give")
            return idx
        return target

    def _records_dataset(self, records, progress: bool):
        from medvqa.data.cache import FeatureCache
        from medvqa.data.features import FeatureDataset

        cache = FeatureCache(self.encoders, progress=progress)
        with self.backbone.lock:   # uncached images run the backbone
            return FeatureDataset(records, self.vocab, cache.images([r.image for r in records]),
                                  cache.questions([r.question for r in records]))

    def features_records(self, records, progress: bool = True, batch_size: int = 64):
        """Fused features of dataset records (through the feature cache) -> (N, D) array, and
        whether each record's top-1 answer is right."""
        import numpy as np
        from torch.utils.data import DataLoader

        from medvqa.data.features import collate

        ds = self._records_dataset(records, progress)
        feats, correct = [], []
        with torch.inference_mode():
            for b in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
                out = self.model({k: v for k, v in b.items() if k != "label"})
                feats.append(out["fused"].float().numpy())
                correct.append((out["logits"].argmax(-1) == b["label"]).numpy())
        return np.concatenate(feats), np.concatenate(correct)

    def logits_records(self, records, progress: bool = True, batch_size: int = 64) -> torch.Tensor:
        """(N, C) answer logits of dataset records, through the feature cache."""
        from medvqa.train.trainer import dataset_logits

        ds = self._records_dataset(records, progress)
        return dataset_logits(self.model, ds, batch_size=batch_size)

    def read_logits(self, records, logits: torch.Tensor, temperature: float | None = None) -> tuple[dict, dict]:
        """-> (qid -> answer, qid -> top-1 probability at `temperature`, default the checkpoint's own)."""
        pred, conf = top1(logits, self.temperatures(logits) if temperature is None else temperature)
        return ({r.qid: self.vocab.answers[i] for r, i in zip(records, pred.tolist())},
                {r.qid: float(c) for r, c in zip(records, conf.tolist())})

    def predict_records(self, records, progress: bool = True, batch_size: int = 64):
        """Answer dataset records through the feature cache -> (qid -> answer, qid -> calibrated confidence)."""
        return self.read_logits(records, self.logits_records(records, progress, batch_size))


def answer_many(predictors, image, question, top_k: int = 5) -> list[Answer]:
    """`Predictor.answer` of several models for one image and question. The image's backbone pass is
    held until every model has answered: under load the cache may let it go in between."""
    im, q = load_image(image), Predictor.check_question(question)
    held = [p.backbone.encode([im]) for p in predictors]
    answers = [p.answer(im, q, top_k) for p in predictors]
    del held   # only now may the pass go
    return answers


def explain_many(predictors, image, question, methods=None, targets=None, layer: int | None = None) -> list:
    """`Predictor.explain` of several models for one image and question: per model its entry of
    `methods` (None: its default_method) and `targets` (None: its predicted answer). Models that read
    one backbone with one method share its work: the cached backbone pass gives the tokens and the
    rollout's start, and one gradient pass through the backbone blocks serves every model's rollout
    (medvqa.explain.gradcam.explain_models). -> one H×W map per predictor."""
    from medvqa.explain.gradcam import explain_models

    im = load_image(image)
    q = Predictor.check_question(question)
    methods = methods or [None] * len(predictors)
    targets = [p._target(t) for p, t in zip(predictors, targets or [None] * len(predictors))]   # bad ones first
    groups: dict = {}   # (backbone, method) -> indices of the predictors in it
    for i, (p, m) in enumerate(zip(predictors, methods)):
        groups.setdefault((p.backbone, m or p.default_method), []).append(i)
    maps = [None] * len(predictors)
    for (bb, method), idx in groups.items():
        # Only what a method must re-run runs; the lock keeps its hooks off other requests' forwards.
        cached = bb.encode([im])[0]
        with bb.lock, torch.enable_grad():
            out = explain_models(bb.encoders, [predictors[i].model for i in idx], im, q, method,
                                 [targets[i] for i in idx], layer=layer, cached=cached, text=bb.question_inputs([q]))
        for i, m in zip(idx, out):
            maps[i] = m
    return maps


__all__ = ["Answer", "ImageError", "Predictor", "answer_many", "explain_many"]
