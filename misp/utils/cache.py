"""Tensor caches on disk: safetensors plus a JSON sidecar that says what made them.

A cache is a pair ``NAME.safetensors`` + ``NAME.json``. The sidecar holds a ``key``: a dict naming the
inputs' hashes and the model that produced the tensors. ``load_cache`` returns the tensors only when the
stored key equals the expected one and the file reads back whole; a stale or corrupt cache returns
``None`` (with a log line saying why) so the caller rebuilds it. It is never silently used.

NaN and +inf are refused both ways: ``save_cache`` raises naming the cache, the tensor and the first bad
row (the cause is near: the model or the input that made them), and ``load_cache`` treats a cache holding
them as corrupt. ``-inf`` is allowed: retrieval and scoring use it to mark padding.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from misp.utils.io import atomic_write_bytes, atomic_write_json, sha256_bytes, sha256_json

log = logging.getLogger(__name__)
_FORMAT_VERSION = 1


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    base = Path(path)
    if base.suffix == ".safetensors":
        base = base.with_suffix("")
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


class NonFiniteCacheError(ValueError):
    """Tensors about to be cached hold NaN or +inf."""


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Where ``tensors`` hold NaN or +inf (``-inf`` marks padding and is allowed), or None."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        bad = torch.isnan(t) | torch.isposinf(t)
        if bool(bad.any()):
            rows = bad.reshape(bad.shape[0], -1).any(1).nonzero().flatten() if t.dim() else torch.zeros(1)
            return f"tensor {name!r} holds NaN or +inf in {len(rows)} row(s), first at row {int(rows[0])}"
    return None


def save_cache(path: str | os.PathLike, tensors: dict[str, torch.Tensor], key: dict[str, Any]) -> None:
    """Write tensors and their sidecar atomically. The sidecar is written last: it is the commit mark.

    Raises:
        NonFiniteCacheError: a floating tensor holds NaN or +inf (nothing is written).
    """
    data_path, meta_path = _paths(path)
    if (where := non_finite(tensors)) is not None:
        raise NonFiniteCacheError(f"cache {data_path} ({key.get('kind', 'tensors')}): {where}; nothing was written")
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write_bytes(data_path, blob)
    atomic_write_json(
        meta_path,
        {"format_version": _FORMAT_VERSION, "key": key, "key_hash": sha256_json(key), "data_sha256": sha256_bytes(blob)},
    )


def load_cache(path: str | os.PathLike, key: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Tensors of a valid cache made from ``key``, else ``None`` (missing, stale or corrupt)."""
    data_path, meta_path = _paths(path)
    if not data_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("cache %s: unreadable sidecar (%s); rebuilding", meta_path, e)
        return None
    if meta.get("format_version") != _FORMAT_VERSION or meta.get("key_hash") != sha256_json(key):
        log.info("cache %s is stale (inputs or model changed); rebuilding", data_path)
        return None
    blob = data_path.read_bytes()
    if sha256_bytes(blob) != meta.get("data_sha256"):
        log.warning("cache %s is corrupt (checksum mismatch); rebuilding", data_path)
        return None
    tensors = load_file(str(data_path))
    if (where := non_finite(tensors)) is not None:
        log.warning("cache %s: %s; rebuilding", data_path, where)
        return None
    return tensors


def cached(path: str | os.PathLike, key: dict[str, Any], build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Load the cache at ``path`` if it matches ``key``, else build, save and return it."""
    hit = load_cache(path, key)
    if hit is not None:
        return hit
    tensors = build()
    save_cache(path, tensors, key)
    return tensors
