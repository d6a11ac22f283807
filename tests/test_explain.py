import numpy as np
import pytest
from PIL import Image

from medvqa.cli import main
from medvqa.predict import Predictor
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("cam"))


def _image():
    a = np.zeros((70, 90), np.uint8)
    a[10:40, 20:60] = 200
    return Image.fromarray(a)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "eigencam"])
def test_cam_shape_range(ckpt, method):
    cam = Predictor.load(ckpt).explain(_image(), "Where is the lesion?", method=method)
    assert cam.shape == (70, 90) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1 and cam.max() > 0


def test_cam_changes_with_target(ckpt):
    p = Predictor.load(ckpt)
    maps = [p.explain(_image(), "Where is the lesion?", target=a) for a in p.vocab.answers]
    assert max(np.abs(m - maps[0]).mean() for m in maps[1:]) > 1e-3
    with pytest.raises(ValueError, match="not an answer"):
        p.explain(_image(), "Where is the lesion?", target="banana")


def test_explain_cli(ckpt, tmp_path, capsys):
    _image().save(tmp_path / "x.png")
    rc = main(["explain", "--checkpoint", str(ckpt), "--image", str(tmp_path / "x.png"), "--question", "Is it normal?",
               "--out", str(tmp_path / "cam.png")])
    assert rc == 0 and Image.open(tmp_path / "cam.png").size == (90, 70)
    assert np.load(tmp_path / "cam.npy").shape == (70, 90)
