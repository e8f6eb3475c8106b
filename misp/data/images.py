"""Moved to ``misp.images`` (the model and negatives rooms read images too); this name stays for old imports."""

from misp.images import ImageReadError, load_rgb, to_rgb, verify_image

__all__ = ["ImageReadError", "load_rgb", "to_rgb", "verify_image"]
