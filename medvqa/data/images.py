"""Load any medical image a user may hand us into an 8-bit RGB PIL image.

Accepts a path, bytes, a PIL image or a numpy array; JPEG/PNG in any mode (L, I;16, I, F,
RGBA, LA, CMYK, P) and DICOM (window from the file's tags, else min-max). EXIF orientation
is honoured. Anything unreadable raises `ImageError` with a message fit for a user.
"""
from __future__ import annotations

import io
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

MAX_PIXELS = 80_000_000  # a decompression-bomb guard well above any radiograph


class ImageError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


def _is_dicom(head: bytes, name: str = "") -> bool:
    return head[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _to_uint8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi):
        a, lo, hi = np.nan_to_num(a), 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((a - lo) * scale).clip(0, 255).astype(np.uint8)


def _dicom_to_pil(data: bytes, name: str) -> Image.Image:
    import pydicom

    try:
        with warnings.catch_warnings():   # a broken file's warnings would stand above our one-line reason
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            a = ds.pixel_array.astype(np.float32)
    except Exception as e:  # pydicom raises many types for broken files
        raise ImageError(f"{name}: not a readable DICOM file ({e.__class__.__name__}: {e})") from None
    if a.ndim == 3 and a.shape[-1] not in (3, 4):
        a = a[a.shape[0] // 2]  # multi-frame: take the middle frame
    def number(tag, default):   # the first value of a (possibly multi-valued) numeric tag
        try:   # pydicom converts a DS value when it is read, so a broken one fails here
            v = getattr(ds, tag, default)
            v = v[0] if isinstance(v, pydicom.multival.MultiValue) else v
            return default if v is None or v == "" else float(v)
        except (TypeError, ValueError):
            raise ImageError(f"{name}: DICOM {tag} is not a number") from None

    a = a * (number("RescaleSlope", 1.0) or 1.0) + number("RescaleIntercept", 0.0)
    c, w = number("WindowCenter", None), number("WindowWidth", None)
    if c is not None and w is not None:
        a = np.clip(a, c - w / 2, c + w / 2)
    u8 = _to_uint8(a)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        u8 = 255 - u8  # MONOCHROME1 shows high values dark
    return Image.fromarray(u8).convert("RGB")


def _pil_to_rgb(im: Image.Image) -> Image.Image:
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))  # medical images sit on black
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, RGB


def load_image(src, name: str | None = None) -> Image.Image:
    """Return an RGB PIL image, or raise ImageError naming `name` (or the path)."""
    if isinstance(src, Image.Image):
        return _pil_to_rgb(src)
    if isinstance(src, np.ndarray):
        a = src
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)):
            if a.dtype != np.uint8:
                a = _to_uint8(a)
            return _pil_to_rgb(Image.fromarray(a))
        raise ImageError(f"{name or 'array'}: expected an H×W or H×W×3/4 array, got shape {a.shape}")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        name = name or str(path)
        if not path.is_file():
            raise ImageError(f"{name}: no such image file")
        data = path.read_bytes()
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data, name = bytes(src), name or "uploaded image"
    else:
        raise ImageError(f"{name or 'image'}: unsupported image input of type {type(src).__name__}")
    if not data:
        raise ImageError(f"{name}: the file is empty")
    if _is_dicom(data[:132], name):
        return _dicom_to_pil(data, name)
    try:
        im = Image.open(io.BytesIO(data))
        if im.size[0] * im.size[1] > MAX_PIXELS:
            raise ImageError(f"{name}: image of {im.size[0]}×{im.size[1]} pixels is too large")
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{name}: not a readable image ({e.__class__.__name__})") from None
    return _pil_to_rgb(im)


AUGMENT_VERSION = "aug1"   # part of the feature-cache key: a changed recipe never reads old views


def augment(im: Image.Image, seed: str) -> Image.Image:
    """One training view of an image, drawn from `seed`: a crop of 75–100 % of the area (aspect 3:4
    to 4:3), a rotation of ±10°, brightness and contrast ±15 %. No flips: left and right are
    answers in these datasets ("which kidney…")."""
    rng = random.Random(seed)
    w, h = im.size
    area, ratio = rng.uniform(0.75, 1.0) * w * h, math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).rotate(rng.uniform(-10, 10), resample=Image.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Contrast(im).enhance(rng.uniform(0.85, 1.15))
