"""Probe: does a QQ-Former started from pretrained text-encoder layers help CMI-MTL?

The public CMI-MTL code starts its Q-Former from bert-base-uncased (LAVIS `init_Qformer`: self-
attention and FFN pretrained, cross-attention new); ours starts from random weights. This probe
trains CMI-MTL on VQA-RAD at the text encoder's width (384, 12 heads; the shipped offline preset
is 256 wide, 4 heads) twice, identical but for the QQ-Former's start:

    --init random   random layers (the control)
    --init text     layer i's self-attention and FFN from MiniLM's layer i, converted from BERT's
                    post-norm to our pre-norm layer (the LayerNorm after a sub-block becomes the
                    pre-norm of the next one); cross-attention and its norm stay new

In both arms the question projection starts as the identity, so the copied layers read the text
tokens in the space they were trained on. Prints one JSON line: validation (the held-out train
slice, as `medvqa train`), and test of the epoch chosen on it. Not a product path.

    python benchmarks/qqformer_init_probe.py --init text --out runs/qqinit/text
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medvqa.config import get_preset
from medvqa.models.encoders import Encoders
from medvqa.models.registry import build
from medvqa.train import trainer
from medvqa.train.checkpoint import load_weights
from medvqa.train.data import prepare


@torch.no_grad()
def copy_bert_layers(qqformer, bert):
    """bert: a transformers BertModel of the QQ-Former's width -> its first layers into qqformer."""
    before = bert.embeddings.LayerNorm                    # the norm that precedes layer 0
    for layer, src in zip(qqformer.layers, bert.encoder.layer):
        a = src.attention
        layer.self_attn.in_proj_weight.copy_(torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight]))
        layer.self_attn.in_proj_bias.copy_(torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias]))
        layer.self_attn.out_proj.load_state_dict(a.output.dense.state_dict())
        layer.norm_sa.load_state_dict(before.state_dict())
        layer.norm_ca.load_state_dict(a.output.LayerNorm.state_dict())
        layer.ffn[0].load_state_dict(src.intermediate.dense.state_dict())
        layer.ffn[3].load_state_dict(src.output.dense.state_dict())
        before = src.output.LayerNorm
    qqformer.norm.load_state_dict(before.state_dict())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", choices=("random", "text"), required=True)
    ap.add_argument("--root", default="../shared/data/vqa_rad")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    preset = get_preset("offline")
    t, c = preset.train, preset.cmi_mtl
    t.epochs, t.seed = a.epochs, a.seed
    enc = Encoders(preset.encoders)
    c.d, c.n_heads = enc.text.config.hidden_size, enc.text.config.num_attention_heads
    data = prepare("vqa-rad", a.root, preset, enc, "all")
    torch.manual_seed(t.seed)
    model = build("cmi-mtl", preset, len(data.vocab), ahead_vocab=data.ahead_vocab)
    with torch.no_grad():
        model.proj_t.weight.copy_(torch.eye(c.d))
        model.proj_t.bias.zero_()
    if a.init == "text":
        copy_bert_layers(model.qqformer, enc.text)

    t0 = time.time()
    res = trainer.fit(model, data.train, data.val, t, a.out, {"model": "cmi-mtl", "qqformer_init": a.init})
    load_weights(model, a.out / "best")
    r = trainer.accuracy(model, data.test)
    print(json.dumps({"init": a.init, "seed": a.seed, "d": c.d, "heads": c.n_heads, "best_epoch": res.best["epoch"],
                      "val": res.best["val_overall"], "test": {x: r[x] for x in ("open", "closed", "overall")},
                      "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
