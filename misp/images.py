"""Image loading and up-front validation.

Readers call :func:`verify_image` on every image a record names before training starts, so a missing or
corrupt file fails the run in its first second rather than hours in, inside a dataloader worker. It also
refuses images under ``MIN_IMAGE_SIDE`` pixels a side: a 1x1 file is a placeholder or a failed download,
and resized to the model's input it trains on a flat colour.

:func:`load_rgb` applies the EXIF orientation tag (phone photos store their pixels sideways and the turn in
EXIF), so an image trains and is evaluated as every viewer shows it. Every image misp feeds a model goes
through :func:`to_rgb`, which maps high-bit-depth modes (16-bit
PNGs open as ``I;16``, 32-bit integer ``I``, float ``F``) onto 0-255 by their range. Pillow's own
``convert("RGB")`` clips them instead, which turns almost every 16-bit pixel white.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MIN_IMAGE_SIDE = 4
"""Smallest width and height, in pixels, of an image misp accepts."""


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


def verify_image(path: str | os.PathLike) -> str | None:
    """Check that ``path`` holds a decodable image.

    Runs ``PIL.Image.verify`` (format structure and, for PNG, chunk checksums) and then decodes the pixel
    data, because ``verify`` alone does not notice a truncated JPEG. JPEGs are decoded at 1/8 scale
    (libjpeg's DCT scaling still reads every scan, so truncation is caught at a fraction of the cost).

    Args:
        path: The image file.

    Returns:
        None when the image is fine, else a one-line reason ("file not found", "cannot decode: ...").
    """
    p = Path(path)
    if not p.exists():
        return "file not found"
    if not p.is_file():
        return "not a regular file"
    try:
        with Image.open(p) as im:
            im.verify()
        # verify() leaves the image unusable, so decoding needs a fresh handle.
        with Image.open(p) as im:
            width, height = im.size  # before draft(), which shrinks the decoded size, not the image's
            if im.format == "JPEG":
                im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            im.load()
            if min(width, height) < MIN_IMAGE_SIDE:
                return (
                    f"image is {width}x{height} pixels, under the {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} minimum "
                    "(a placeholder or a failed download?)"
                )
    # Pillow signals corrupt data with many unrelated types (OSError, SyntaxError, struct.error,
    # ValueError, DecompressionBombError); any of them means the file cannot be used.
    except Exception as e:  # noqa: BLE001
        return f"cannot decode image ({type(e).__name__}: {e})"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, high-bit-depth modes scaled by their range rather than clipped.

    ``I;16*`` (16-bit greyscale PNGs) and ``I`` are divided by 257 (65535 -> 255); an ``I`` image whose
    values exceed 16 bits is scaled by its own maximum. ``F`` is taken as [0, 1] when its maximum is at
    most 1, else as 0-255. Every other mode goes through Pillow's ``convert("RGB")``.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if image.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        else:
            scale = 1.0 / 257.0 if top <= 65535 else 255.0 / top
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Load an image fully into memory as RGB.

    Args:
        path: The image file.

    Returns:
        A decoded ``PIL.Image.Image`` in mode ``"RGB"``, turned upright by its EXIF orientation (no file
        handle left open).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: the file exists but cannot be decoded; the message names the path.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except Exception as e:  # noqa: BLE001 - see verify_image for why the catch is broad
        raise ImageReadError(f"cannot read image {p}: {type(e).__name__}: {e}") from e
