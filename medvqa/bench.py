"""Speed, size and efficiency measurements (DESIGN §11). `python -m medvqa bench --json`.

Sizes and FLOPs are counted on the meta device (no weights, no hub) with
`torch.utils.flop_counter`; FLOPs count a multiply-add as 2, so MACs = FLOPs / 2 (fvcore and
most papers report MACs as "FLOPs"). Timings are medians of repeated runs on this machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def _median_ms(fn, repeat: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(1000 * statistics.median(ts), 2)


def _median_ms_pair(a, b, repeat: int = 5) -> tuple[float, float]:
    """Medians of `a` and `b` timed in turn (a, b, a, b, …) after one warm-up each."""
    a(), b()
    ts = ([], [])
    for _ in range(repeat):
        for fn, t in zip((a, b), ts):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return tuple(round(1000 * statistics.median(t), 2) for t in ts)


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _backbones_meta(preset):
    """The preset's image and text backbones, built from configs only (no weights, no hub)."""
    from transformers import (BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model,
                              RobertaConfig, RobertaModel)

    from medvqa.models.encoders import DINOV2_S14

    e = preset.encoders
    if e.image.startswith("openai/"):
        img = CLIPVisionModel(CLIPVisionConfig(image_size=e.image_size, patch_size=16))
    else:
        img = Dinov2Model(Dinov2Config(**DINOV2_S14))
    txt = (RobertaModel(RobertaConfig(), add_pooling_layer=False) if "roberta" in e.text
           else BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                   intermediate_size=1536),
                          add_pooling_layer=False))
    return img, txt


def model_size(preset_name: str, n_classes: int = 498, L: int = 20) -> dict:
    """Parameters and per-question FLOPs of CMI-MTL with its backbones (classification path)."""
    from medvqa.config import get_preset
    from medvqa.models.registry import build

    p = get_preset(preset_name)
    e = p.encoders
    vocab = 32128 if preset_name == "paper" else 1000   # t5-base's vocabulary; ours is compact
    with torch.device("meta"):
        img, txt = _backbones_meta(p)
        model = build("cmi-mtl", p, n_classes, ahead_vocab=list(range(vocab)))
        px = torch.randn(1, 3, e.image_size, e.image_size)
        ids = torch.zeros(1, L, dtype=torch.long)
        n_img = (e.image_size // (16 if e.image.startswith("openai/") else 14)) ** 2 + 1
        batch = {"image_tokens": torch.randn(1, n_img, e.image_dim), "text_tokens": torch.randn(1, L, e.text_dim),
                 "text_mask": torch.ones(1, L, dtype=torch.long), "text_pooled": torch.randn(1, e.text_dim)}
        f_img = _flops(lambda: img(pixel_values=px))
        f_txt = _flops(lambda: txt(input_ids=ids))
        model.eval()
        f_head = _flops(lambda: model(batch))
    n = {"image_encoder": _params(img), "text_encoder": _params(txt), "cmi_mtl_modules": _params(model)}
    n["total"] = sum(n.values())
    flops = f_img + f_txt + f_head
    return {"params": n, "gflops": round(flops / 1e9, 2), "gmacs": round(flops / 2e9, 2),
            "gflops_cmi_mtl_modules": round(f_head / 1e9, 3), "image_size": e.image_size, "question_len": L}


def fusion_cost(d: int = 256, K: int = 32, L: int = 20, blocks: int = 2) -> dict:
    """CMM fusion vs a Transformer fusion of the same width (Table 2's `cmm` ablation)."""
    from medvqa.models.cmi_mtl import CrossMambaBlock, TransformerFusionBlock

    out = {}
    for name, make in (("cmm", lambda: CrossMambaBlock(d, d_state=8)),
                       ("transformer", lambda: TransformerFusionBlock(d, 4))):
        with torch.device("meta"):
            bl = torch.nn.ModuleList(make() for _ in range(blocks)).eval()
            z, t, pad = torch.randn(1, K, d), torch.randn(1, L, d), torch.zeros(1, L, dtype=torch.bool)

            def run():
                zz, tt = z, t
                for b in bl:
                    zz, tt = b(zz, tt, pad)
            out[name] = {"params": _params(bl), "flops": _flops(run)}
    out["ratio_params"] = round(out["cmm"]["params"] / out["transformer"]["params"], 3)
    out["ratio_flops"] = round(out["cmm"]["flops"] / out["transformer"]["flops"], 3)
    return out


def scan_speedup(lengths=(64, 256, 512), b: int = 8, E: int = 512, N: int = 8) -> dict:
    """Training step (forward + backward) of the selective scan: sequential time / parallel time."""
    from medvqa.models.mamba import selective_scan

    out = {}
    for L in lengths:
        g = torch.Generator().manual_seed(L)
        u = torch.randn(b, L, E, generator=g, requires_grad=True)
        delta = torch.rand(b, L, E, generator=g).mul(0.1).requires_grad_()
        A = -torch.rand(E, N, generator=g).requires_grad_()
        B, C = torch.randn(b, L, N, generator=g), torch.randn(b, L, N, generator=g)
        D = torch.ones(E, requires_grad=True)
        ms = {m: _median_ms(lambda m=m: selective_scan(u, delta, A, B, C, D, mode=m).sum().backward(),
                            repeat=3, warmup=1)
              for m in ("sequential", "parallel")}
        out[str(L)] = {"sequential_ms": ms["sequential"], "parallel_ms": ms["parallel"],
                       "speedup": round(ms["sequential"] / ms["parallel"], 2)}
    return out


def answer_latency(checkpoints: list[str]) -> dict:
    """Warm `Predictor.answer` on a new 224-px image (the token cache emptied before each call: a cached
    image costs only the heads), and the backbone forward alone, per checkpoint."""
    from PIL import Image

    from medvqa.predict import Predictor
    from medvqa.train.checkpoint import CheckpointError

    im = Image.new("RGB", (224, 224), (90, 90, 90))
    out = {}
    for ck in checkpoints:
        try:
            p = Predictor.load(ck)
        except CheckpointError:   # not installed here
            continue
        enc = p.encoders

        def new_image(fn, *a, **kw):
            return lambda: (p.backbone.clear(), fn(im, *a, **kw))
        answer = _median_ms(new_image(p.answer, "Is there a fracture?"), repeat=11)
        # an open question: CMI-MTL's AHead also generates its free text when the answer is open
        answer_open = _median_ms(new_image(p.answer, "Which organ is shown in this image?"), repeat=11)
        with torch.inference_mode():
            backbone = _median_ms(lambda: enc.encode_image(enc.preprocess([im])), repeat=11)
        cam = _median_ms(new_image(p.explain, "Is there a fracture?", method="gradcam"), repeat=5, warmup=1)
        rollout = _median_ms(new_image(p.explain, "Is there a fracture?", method="rollout"), repeat=5, warmup=1)
        query = (_median_ms(new_image(p.explain, "Is there a fracture?", method="query-attention"), repeat=5, warmup=1)
                 if "query-attention" in p.methods else None)   # gradient-free: about one answer
        epoch = None
        if (p.path / "metrics.json").is_file():
            m = __import__("json").loads((p.path / "metrics.json").read_text())
            epoch = round(m["train_seconds"] / m["epochs"], 1) if m.get("train_seconds") and m.get("epochs") else None
        out[ck] = {"answer_ms": answer, "answer_open_question_ms": answer_open, "image_backbone_ms": backbone,
                   "ratio": round(answer / backbone, 2),
                   "gradcam_ms": cam, "gradcam_ratio": round(cam / answer, 2),
                   "rollout_ms": rollout, "rollout_ratio": round(rollout / answer, 2),
                   "query_attention_ms": query, "default_method": p.default_method, "epoch_s": epoch}
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def _variants(n: int, folder, seed: int = 0) -> list[str]:
    """n distinct JPEGs in `folder` (the shipped examples, brightness-shifted), as uploads arrive:
    each misses the token cache."""
    import numpy as np
    from PIL import Image

    from medvqa.app.common import examples

    base = [np.asarray(Image.open(e["path"]).convert("RGB"), np.int16) for e in examples()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = np.clip(base[i % len(base)] + int(rng.integers(-40, 40)), 0, 255).astype(np.uint8)
        out.append(os.path.join(folder, f"v{seed}-{i}.jpg"))
        Image.fromarray(a).save(out[-1], quality=92)
    return out


FIRST_CLICK = """
import json, os, sys, time
t0 = time.perf_counter()
from medvqa.app import build
from medvqa.app.ask import OWN_METHOD, run_ask
from medvqa.app.common import examples
build()
t1 = time.perf_counter()
e = next(e for e in examples() if e["dataset"] == "slake")   # SLAKE: the slowest first click before the shipped index
run_ask(e["path"], e["question"], e["dataset"], OWN_METHOD, 0.5, e["answer"])
t2 = time.perf_counter()
print(json.dumps({"app_up_s": round(t1 - t0, 1), "first_click_s": round(t2 - t1, 1), "start_to_first_click_s": round(t2 - t0, 1)}))
"""


def first_click() -> dict:
    """A fresh install (empty cache dir: the backbone is converted again) with the data folder present:
    seconds from app start to the app up, and from then to the answers, maps and nearest cases of a
    first click on a SLAKE example made at once (it waits for the first screen's models and backbone)."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "MEDVQA_CACHE": cache, "MEDVQA_DATA": os.path.join(cache, "user")}
        out = subprocess.run([sys.executable, "-c", FIRST_CLICK], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def app_speed(n_clients: int = 20, n_rss: int = 200) -> dict:
    """The app's ask path, warm: one click (three models' answers, default maps and nearest cases on a
    new image) against one backbone pass, timed in turn; 20 concurrent `ask` requests against the same requests
    one by one (two rounds); the RSS with every shipped checkpoint loaded, and its growth over `n_rss` asks."""
    import concurrent.futures as cf

    from medvqa.app.ask import OWN_METHOD, ask_json, run_ask
    from medvqa.predict import Predictor, checkpoints_dir

    import tempfile

    tmp = tempfile.mkdtemp(prefix="medvqa-bench-")
    preds = [Predictor.load(c.parent) for c in sorted(checkpoints_dir().glob("*/config.json"))]
    bb = preds[0].backbone
    ims = _variants(max(n_clients, 8) + 8, tmp)
    q = "Is there evidence of an aortic aneurysm?"
    from medvqa.data import load_image

    enc, im0 = bb.encoders, load_image(ims[0])

    def backbone_pass():
        with torch.inference_mode():
            enc.encode_image(enc.preprocess([im0]))
    run_ask(ims[0], q, "vqa-rad", OWN_METHOD, 0.5, "")                        # warm: models, index, kernels
    clicks = iter(ims[1:8])
    # Interleaved, one of each in turn: a shared CPU's slow spells then fall on both sides of the ratio.
    backbone, click = _median_ms_pair(backbone_pass, lambda: run_ask(next(clicks), q, "vqa-rad", OWN_METHOD, 0.5, ""),
                                      repeat=6)
    recheck = _median_ms(lambda: run_ask(ims[7], "Is this a CT scan?", "vqa-rad", OWN_METHOD, 0.5, ""), repeat=3)

    reqs = [(im, f"Is there a lesion in region {i}?") for i, im in enumerate(ims[8:8 + n_clients])]

    def ask(r):
        t = time.perf_counter()
        ask_json(r[0], r[1], "vqa-rad")
        return time.perf_counter() - t
    serial = concurrent = 0.0
    lat, batches = [], []
    for _ in range(2):   # two rounds of (one by one, all at once), summed: the CPU is shared
        bb.clear()
        t = time.perf_counter()
        for r in reqs:
            ask(r)
        serial += time.perf_counter() - t
        bb.clear()
        n_batches = len(bb.batches)
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(n_clients) as ex:
            lat += ex.map(ask, reqs)
        concurrent += time.perf_counter() - t
        batches += bb.batches[n_batches:]
    lat.sort()

    rss0 = _rss_mb()
    more = _variants(n_rss, tmp, seed=1)
    for i, im in enumerate(more):
        ask_json(im, f"Is there a finding number {i}?", "vqa-rad" if i % 2 else "slake")
    rss1 = _rss_mb()
    return {"backbone_ms": backbone, "ask_click_ms": click, "ask_click_ratio": round(click / backbone, 2),
            "ask_click_same_image_ms": recheck,
            "concurrent": {"clients": n_clients, "serial_s": round(serial, 2), "concurrent_s": round(concurrent, 2),
                           "speedup": round(serial / concurrent, 2), "p50_ms": round(1000 * lat[len(lat) // 2]),
                           "p95_ms": round(1000 * lat[int(0.95 * (len(lat) - 1))]),
                           "backbone_batches": len(batches), "images_encoded": sum(batches),
                           "largest_batch": max(batches, default=0)},
            "rss": {"checkpoints_loaded": len(preds), "rss_mb": rss0, "after_requests": n_rss, "rss_after_mb": rss1,
                    "growth_pct": round(100 * (rss1 - rss0) / rss0, 2)}}


def run(checkpoints=("cmi-mtl-vqa-rad", "cmdpi-vqa-rad", "baseline-vqa-rad")) -> dict:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    first = first_click()                      # before anything here warms a cache
    app = app_speed()
    answer = answer_latency(list(checkpoints))
    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
        "model_size": {p: model_size(p) for p in ("paper", "offline")},
        "paper_reported": {"params": 245e6, "gflops": 74.2, "train_memory_gb": 19},
        "fusion": fusion_cost(),
        "scan_parallel_speedup": scan_speedup(),
        "answer": answer,
        "app": {**app, **first},
        # issue #35 keys (ratios in one run: the CPU may be shared)
        "ask_click_ms": app["ask_click_ms"], "backbone_ms": app["backbone_ms"],
        "ask_click_over_backbone": app["ask_click_ratio"], "first_click_s": first["first_click_s"],
        "concurrent_speedup": app["concurrent"]["speedup"], "rss_growth_pct": app["rss"]["growth_pct"],
        # DESIGN §9 keys
        "answer_ms": {k: v["answer_ms"] for k, v in answer.items()},
        "answer_overhead_ratio": {k: v["ratio"] for k, v in answer.items()},
        "gradcam_ratio": {k: v["gradcam_ratio"] for k, v in answer.items()},
        "epoch_s": {k: v["epoch_s"] for k, v in answer.items()},
    }
