"""Image loading and up-front validation.

Readers call :func:`verify_image` on every image a record names before training starts, so a missing or
corrupt file fails the run in its first second rather than hours in, inside a dataloader worker.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image


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
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    # Pillow signals corrupt data with many unrelated types (OSError, SyntaxError, struct.error,
    # ValueError, DecompressionBombError); any of them means the file cannot be used.
    except Exception as e:  # noqa: BLE001
        return f"cannot decode image ({type(e).__name__}: {e})"
    return None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Load an image fully into memory as RGB.

    Args:
        path: The image file.

    Returns:
        A decoded ``PIL.Image.Image`` in mode ``"RGB"`` (no file handle left open).

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
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - see verify_image for why the catch is broad
        raise ImageReadError(f"cannot read image {p}: {type(e).__name__}: {e}") from e
