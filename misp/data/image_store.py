"""Images embedded in a dataset (bytes, or decoded PIL images), stored once each, named by their content.

A Hugging Face dataset may carry its images inside the rows (parquet ``{"bytes", "path"}`` structs, or PIL
images once decoded). misp's pixel cache and CLIP-embedding cache key an image by its file, so an embedded
image is written to ``<root>/<sha256 of its bytes>.<format>`` the first time it is met: the same bytes in
any row, split or dataset land on the same file, which is never written again (nor its mtime touched, so
the CLIP cache's file fingerprint stays valid), and both caches therefore key it by its content.

Writes are atomic (a temporary file, then a rename), so ranks or workers that meet the same image at once
both end with one whole file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


def _suffix(data: bytes) -> str:
    # The suffix is cosmetic (PIL reads by content); an undecodable blob keeps ".bin" and fails verification.
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _SUFFIXES.get(im.format or "", ".img")
    except Exception:  # noqa: BLE001 - any unreadable blob: the verifier reports why
        return ".bin"


def image_bytes(value: Any) -> bytes | None:
    """The encoded bytes of an embedded image, or None when ``value`` is not one.

    Accepts raw ``bytes``, a ``{"bytes": ..., "path": ...}`` struct with bytes (Hugging Face's ``Image``
    feature undecoded) and a PIL image (encoded as PNG, so equal pixels give equal bytes).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict) and value.get("bytes") is not None:
        return bytes(value["bytes"])
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return None


class ImageStore:
    """A folder of embedded images, each named by the SHA-256 of its bytes.

    Args:
        root: the folder (created on first write).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser().absolute()
        self._known: dict[str, Path] = {}
        self.written = 0
        """Files this store wrote (an image met before, in this run or an earlier one, is not written)."""

    def put(self, data: bytes) -> Path:
        """The file holding ``data``, written now only if no file holds it yet."""
        digest = hashlib.sha256(data).hexdigest()
        known = self._known.get(digest)
        if known is not None:
            return known
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{digest}{_suffix(data)}"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{digest}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.written += 1
        self._known[digest] = path
        return path
