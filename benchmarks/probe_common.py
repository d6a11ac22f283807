"""What the saliency probes share (imported by benchmarks/*_variants.py, run from the repository root)."""
import numpy as np
import torch
from PIL import Image

from medvqa.data import load_image
from medvqa.explain.gradcam import ImageToLogits


def up(m, size):
    """A patch-grid map at the image's own size, as `medvqa.explain.explain` resizes it."""
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize(size, Image.BILINEAR), dtype=np.float32)


def case_inputs(enc, model, record):
    """-> (pixels -> logits wrapper for the record's question, pixels (1, 3, S, S), the predicted answer)."""
    w = ImageToLogits(enc, model, enc.question_inputs([record.question])).eval()
    x = enc.preprocess([load_image(record.image)])
    with torch.no_grad():
        target = int(w(x).argmax(-1))
    return w, x, target
