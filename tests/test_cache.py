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
