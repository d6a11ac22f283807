import pytest
import torch

from medvqa.config import get_preset
from medvqa.data import load_split
from medvqa.data.cache import FeatureCache
from medvqa.models.encoders import Encoders
from tests.conftest import data_root


@pytest.mark.data
def test_feature_cache_fills_and_reuses(tmp_path):
    root = data_root("vqa_rad")
    recs = load_split("vqa-rad", root, "test").records[:12]
    enc = Encoders(get_preset("offline").encoders)
    c1 = FeatureCache(enc, root=tmp_path, progress=False)
    imgs = c1.images([r.image for r in recs])
    qs = c1.questions([r.question for r in recs])
    assert c1.misses == len(imgs) + len(qs) and c1.hits == 0
    some = next(iter(imgs.values()))["tokens"]
    assert some.shape == (257, 384) and some.dtype == torch.float16
    c2 = FeatureCache(enc, root=tmp_path, progress=False)
    imgs2 = c2.images([r.image for r in recs])
    c2.questions([r.question for r in recs])
    assert c2.misses == 0 and c2.hits == len(imgs) + len(qs)
    k = next(iter(imgs))
    assert torch.equal(imgs[k]["tokens"], imgs2[k]["tokens"])
    # The cached entry equals a fresh forward pass (fp16 rounding aside).
    from medvqa.data import load_image

    with torch.inference_mode():
        g, loc = enc.encode_image(enc.preprocess([load_image(k)]))
    assert torch.allclose(imgs[k]["tokens"][1:].float(), loc[0], atol=2e-2)


def test_augmented_views_are_cached_apart_and_drawn_in_training(tmp_path):
    import random

    from PIL import Image

    from medvqa.data import AnswerVocab
    from medvqa.data.features import FeatureDataset
    from medvqa.data.images import augment
    from medvqa.train.data import attach_pixels
    from tests.helpers import make_cases

    im = Image.fromarray((torch.rand(48, 40) * 255).to(torch.uint8).numpy()).convert("RGB")
    a, b = augment(im, "x-1"), augment(im, "x-1")
    assert a.tobytes() == b.tobytes() and a.tobytes() != augment(im, "x-2").tobytes()   # seeded, per view

    recs = make_cases(tmp_path / "imgs", 4)
    enc = Encoders(get_preset("tiny").encoders)
    cache = FeatureCache(enc, root=tmp_path / "cache", progress=False)
    paths = [r.image for r in recs]
    v0, v1 = cache.images(paths), cache.images(paths, view=1)
    assert cache.misses == 2 * len(v0)                      # a view never reads the image's own entry
    p = paths[0]
    assert not torch.equal(v0[p]["tokens"], v1[p]["tokens"])
    ds = FeatureDataset(recs, AnswerVocab.build(recs), v0, cache.questions([r.question for r in recs]), views=[v1])
    attach_pixels(ds, cache, 16)
    assert not torch.equal(ds.pixels[p], ds.pixel_views[0][p])
    random.seed(0)
    seen = set()
    for _ in range(20):   # image tokens and pixel targets always come from the same view
        it = ds[0]
        v = 0 if torch.equal(it["image_tokens"], v0[p]["tokens"]) else 1
        assert torch.equal(it["pixels"], [ds.pixels, ds.pixel_views[0]][v][p])
        seen.add(v)
    assert seen == {0, 1}
