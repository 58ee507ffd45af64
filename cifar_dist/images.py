"""Image files decoded as the nets see them: RGB uint8 (32, 32, 3), whatever the file's size, mode
or bit depth (Pillow decodes; greyscale of more than 8 bits is scaled here, where Pillow would clip).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_dist.errors import DataError

IMAGE_SIZE = 32  # pixels; other sizes are resized on decode
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
# Greyscale modes of more than 8 bits ("I": 32-bit TIFF, older Pillow's 16-bit PNG; "F": 32-bit float TIFF); Pillow's
# convert("RGB") clips them at 255 (wide_to_8bit reads them instead).
WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
IMAGE_READER = 2  # bump when read_image decodes some file differently (2: modes "I" and "F" by their range)


def read_image(src: bytes | Path) -> np.ndarray:
    """An image file's bytes or path as RGB uint8 (32, 32, 3), whatever its size, mode or bit depth."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        return net_pixels(im)


def net_pixels(im: Image.Image) -> np.ndarray:
    """An opened image (its pixels decoded here) as RGB uint8 (32, 32, 3)."""
    if im.mode in WIDE_MODES:
        im = Image.fromarray(wide_to_8bit(np.asarray(im), im.mode))
    im = im.convert("RGB")
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def wide_to_8bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """A greyscale image of more than 8 bits as uint8 (Pillow's convert clips such values at 255).
    16-bit modes keep their high byte, as Pillow does for 16-bit RGB. Modes "I" (32-bit integers) and
    "F" (32-bit floats) say nothing of the range their values use, so the image's own values decide:
    the smallest of [0, 1] (floats only), [0, 255] and [0, 65535] that holds them is full scale, so
    a 32-bit TIFF of 8-bit values stays as bright as it is, not black. Values that are negative, not
    finite or beyond 16 bits are refused: no full scale can be read from them."""
    if mode.startswith("I;16"):
        return (pixels.astype(np.int64) >> 8).astype(np.uint8)
    values = pixels.astype(np.float64)
    if not np.isfinite(values).all() or values.min() < 0:
        raise DataError(f"mode {mode} pixels from {values.min():g} to {values.max():g}: negative or not finite, "
                        "no brightness to read from them")
    if mode == "F" and values.max() <= 1:
        return np.rint(values * 255).astype(np.uint8)
    bits = next((b for b in (8, 16) if values.max() < 2**b), None)
    if bits is None:  # a 32-bit range: which part of it the image meant to use is anyone's guess
        raise DataError(f"mode {mode} pixels up to {values.max():g}, beyond 16 bits: save it with 8 or 16 bits a pixel")
    return (values.astype(np.int64) >> (bits - 8)).astype(np.uint8)  # the high byte, as for 16 bits
