"""Checkpoints are folders: model.safetensors + config.json + metrics.json, written atomically,
and backbone.safetensors when the backbones' top blocks were trained (medvqa.train.tuning).

Only what the pip-installed backbones cannot rebuild is stored: of a backbone, only its tuned blocks
(encode_tuned: a matrix as an 8-bit difference from the pretrained one where that is no less exact
than float16, else float16 where that holds, else float32). The model's tensors are stored in
float16 when float32 would exceed the size budget; everything loads back as float32.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MAX_BYTES = 20 * 1024 * 1024
TUNED_FILE = "backbone.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing or malformed."""


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


DELTA_Q, DELTA_SCALE = ".delta_q", ".delta_scale"   # suffixes of an 8-bit difference's two tensors


def encode_tuned(tensors: dict, base: dict) -> dict:
    """Tuned backbone tensors -> what TUNED_FILE stores. A matrix whose difference from its
    pretrained value `base[k]` (which every reader has: the pip-installed backbone) quantised to
    int8 per row is at least as exact as the tensor in float16 is stored as that difference: two
    blocks of DINOv2-S then take 3.6 MB instead of 7.1 MB, and a CMI-MTL checkpoint stays ≤ 20 MB."""
    out = {}
    for k, t in tensors.items():
        t = t.detach().cpu().float().contiguous() if t.is_floating_point() else t.detach().cpu()
        h = fp16_where_it_holds(t)
        if t.ndim == 2:
            d = t - base[k].float()                                                   # (rows, cols)
            scale = (d.abs().amax(1, keepdim=True) / 127).clamp_min(1e-12)              # (rows, 1)
            q = (d / scale).round().clamp(-127, 127).to(torch.int8)
            if (base[k].float() + q.float() * scale - t).abs().max() <= (h.float() - t).abs().max():
                out |= {k + DELTA_Q: q, k + DELTA_SCALE: scale}
                continue
        out[k] = h
    return out


def decode_tuned(stored: dict, base: dict) -> dict:
    """The inverse of encode_tuned -> float32 tensors named as in Encoders' state dict."""
    out = {}
    for k, v in stored.items():
        if k.endswith(DELTA_Q):
            name = k[:-len(DELTA_Q)]
            out[name] = base[name].float() + v.float() * stored[name + DELTA_SCALE]
        elif not k.endswith(DELTA_SCALE):
            out[k] = v.float() if v.is_floating_point() else v
    return out


def fp16_where_it_holds(t: torch.Tensor) -> torch.Tensor:
    """`t` in float16 unless that loses it: an overflow, or a tensor so small throughout (a
    layer-scale near 0) that float16's subnormals round it by more than 0.1 % of its largest value."""
    if not t.is_floating_point():
        return t
    h = t.half()
    ok = bool(torch.isfinite(h).all()) and float((h.float() - t.float()).abs().max()) <= 1e-3 * float(t.abs().max())
    return h if ok else t


def check_out(out: Path):
    """Saving replaces `out` whole: refuse a file, or a folder that holds something other than a checkpoint."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").is_file())):
        raise CheckpointError(f"{out}: exists and is not a checkpoint folder; saving would replace it (choose another --out)")


def save_checkpoint(out: Path, model: torch.nn.Module, config: dict, metrics: dict | None = None):
    """Write to `<out>.tmp-<pid>`, then swap it in: readers never see half a checkpoint. A model
    behind tuned backbone blocks (medvqa.train.tuning.TunedBackbone) writes those to TUNED_FILE."""
    out = Path(out)
    check_out(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tuned = {}
    if hasattr(model, "backbone_tensors"):
        tuned = encode_tuned(model.backbone_tensors(), model.base)
        model = model.model
    sd, seen = {}, set()
    for k, v in model.state_dict().items():  # tied weights (T5 embeddings / lm_head) are stored once
        key = (v.data_ptr(), v.shape)
        if key not in seen:
            seen.add(key)
            sd[k] = v.detach().cpu().contiguous()
    n_bytes = sum(v.numel() * v.element_size() for v in (*sd.values(), *tuned.values()))
    dtype = "float16" if n_bytes > MAX_BYTES else "float32"
    if dtype == "float16":
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, str(tmp / "model.safetensors"))
    if tuned:
        save_file(tuned, str(tmp / TUNED_FILE))
    (tmp / "config.json").write_text(json.dumps({**config, "stored_dtype": dtype}, indent=1))
    (tmp / "metrics.json").write_text(json.dumps(metrics or {}, indent=1))
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def read_config(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file() or not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{ckpt}: not a checkpoint folder (needs model.safetensors and config.json)")
    from medvqa.config import preset_from_dict
    from medvqa.models.registry import MODELS

    try:
        cfg = json.loads((ckpt / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{ckpt}/config.json: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("preset"), dict):
        raise CheckpointError(f"{ckpt}/config.json: no preset")
    if cfg.get("model") not in MODELS:
        raise CheckpointError(f"{ckpt}/config.json: unknown model {cfg.get('model')!r} (one of {', '.join(MODELS)})")
    try:  # here, so that every reader of a checkpoint refuses a preset this code cannot rebuild
        preset_from_dict(cfg["preset"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}/config.json: {e}") from None
    for k in ("temperature", "temperature_yes_no"):   # 0 or NaN showed a wrong answer, a negative T reversed the ranking
        t = cfg.get(k, 1.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise CheckpointError(f"{ckpt}/config.json: {k} {t!r}: use a number above 0, or remove it (T = 1)")
    return cfg


def load_weights(model: torch.nn.Module, ckpt: Path):
    """`ckpt`/model.safetensors into `model`, as float32. Tied tensors (T5 embeddings / lm_head),
    stored once, load through the tensor they share; any other missing or extra key is an error."""
    sd = _float32(_read_safetensors(Path(ckpt) / "model.safetensors"))
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: weights do not fit the model in config.json ({str(e)[:200]})") from None
    stored = {t.data_ptr() for k, t in model.state_dict().items() if k in sd}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in stored]
    if untied or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not fit the model in config.json "
                              f"(missing {untied[:3]}, unexpected {unexpected[:3]})")


def load_tuned(ckpt: Path, base: dict) -> dict | None:
    """The tuned backbone tensors of a checkpoint (float32, named as in Encoders' state dict; `base`:
    the pretrained backbones' state dict), or None when its backbones are the frozen pretrained ones."""
    path = Path(ckpt) / TUNED_FILE
    if not path.is_file():
        return None
    return decode_tuned(_read_safetensors(path), base)


def _read_safetensors(path: Path) -> dict:
    try:
        return load_file(str(path))
    except Exception as e:   # safetensors raises its own error type for a truncated or foreign file
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None


def _float32(sd: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def load_checkpoint(ckpt: Path):
    """-> (model in eval mode, config dict, metrics dict). Never unpickles anything."""
    from medvqa.config import preset_from_dict
    from medvqa.models.registry import build

    cfg = read_config(ckpt)
    preset = preset_from_dict(cfg["preset"])
    model = build(cfg["model"], preset, len(cfg["answers"]), ahead_vocab=cfg.get("ahead_vocab"),
                  text_vocab=cfg.get("text_vocab"))
    load_weights(model, ckpt)
    metrics_path = Path(ckpt) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return model.eval(), cfg, metrics
