"""CLIP image and text embeddings (method.md section 2), with an on-disk cache.

Works with any open_clip model through a duck-typed bundle: ``bundle.model`` (``encode_image``,
``encode_text``), ``bundle.preprocess`` (PIL image -> tensor), ``bundle.tokenizer`` (list of str -> long
tensor) and ``bundle.identity`` (a string naming the architecture and weights), as
``misp.models.clip.ClipBundle`` provides.

Outputs are float32, L2-normalised, one row per input in input order.

Cache validity. The cache key names the model identity and a fingerprint of the inputs:

- images: a hash over ``(absolute path, size, mtime_ns, ctime_ns, inode)`` of every file in order. It
  needs one ``stat`` per file (cheap for a million files, no reads) and detects changed (rewritten),
  added, removed and reordered images. The status-change time and the inode catch what size and mtime
  miss: a same-sized file copied over an image with its timestamps preserved (``cp -p``, ``rsync -t``)
  keeps both, but no user can set ``ctime``, and ``rsync`` renames a new inode into place. The cost is a
  spurious rebuild after a ``chmod`` or a move of the dataset, never a stale embedding.
- texts: a hash of the texts in order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from misp.images import load_rgb
from misp.utils.cache import cached

_CACHE_VERSION = 2  # 2: images are turned upright by their EXIF orientation (misp.images.load_rgb)


class _ImageFiles(Dataset):
    """Preprocessed images read from disk, in the given order."""

    def __init__(self, paths: Sequence[Path], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        # load_rgb scales 16-bit images instead of clipping them, and names the file when it fails.
        return self.preprocess(load_rgb(self.paths[i]))


def image_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """Hash of ``(absolute path, size, mtime_ns, ctime_ns, inode)`` of every file, in order (one ``stat`` each)."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise FileNotFoundError(f"cannot stat image {p}: {e}") from e
        stamp = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
        h.update(f"{os.path.abspath(p)}\0{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def text_fingerprint(texts: Sequence[str]) -> str:
    """Hash of the texts in order; each is length-prefixed so that no two lists collide by concatenation."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(f"{len(b)}:".encode())
        h.update(b)
    return h.hexdigest()


def _model_dtype(model: Any) -> torch.dtype:
    """The dtype inputs must have: the model's floating parameters' (float32 for a parameter-less stand-in)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


@contextmanager
def _inference(model: Any, device: torch.device) -> Iterator[torch.dtype]:
    """Eval mode, no_grad and the model on ``device``; the training flag is restored afterwards."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.to(device)
        model.eval()
    try:
        with torch.no_grad():
            yield _model_dtype(model)
    finally:
        if isinstance(model, torch.nn.Module) and was_training:
            model.train()


def _normalise(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1).cpu()


def embed_images(
    bundle: Any,
    paths: Sequence[Path],
    batch_size: int = 256,
    cache_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """CLIP image embeddings ``h_v`` of image files.

    Args:
        bundle: a ClipBundle (``model``, ``preprocess``, ``identity``).
        paths: image files; the output keeps their order.
        batch_size: images per forward pass.
        cache_path: if set, a safetensors cache (plus JSON sidecar) keyed on the model identity and the
            images' fingerprint (see the module docstring); a valid cache is loaded without running the
            model, a stale or corrupt one is rebuilt.
        device: where the model runs; the model is moved there (and left there).
        num_workers: DataLoader workers that decode and preprocess the images.
        progress: show a tqdm bar.

    Returns:
        ``[P, d]`` float32 on the CPU, rows of unit norm.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("embed_images got no image paths")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def build() -> dict[str, torch.Tensor]:
        dev = torch.device(device)
        loader = DataLoader(
            _ImageFiles(paths, bundle.preprocess),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=dev.type == "cuda",
        )
        out = []
        with (
            _inference(bundle.model, dev) as dtype,
            tqdm(total=len(paths), desc="CLIP images", unit="img", disable=not progress) as bar,
        ):
            for images in loader:
                out.append(
                    _normalise(bundle.model.encode_image(images.to(dev, dtype=dtype, non_blocking=True)))
                )
                bar.update(images.shape[0])
        embeddings = torch.cat(out)
        _check_finite(embeddings, [str(p) for p in paths], "image")
        return {"embeddings": embeddings}

    if cache_path is None:
        return build()["embeddings"]
    return _cached_embeddings(cache_path, "clip_image_embeddings", bundle, len(paths), image_fingerprint(paths), build)


def embed_texts(
    bundle: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    cache_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """CLIP text embeddings ``h_t`` of strings.

    Args:
        bundle: a ClipBundle (``model``, ``tokenizer``, ``identity``).
        texts: the strings; the output keeps their order.
        batch_size: texts per forward pass.
        cache_path: if set, a safetensors cache keyed on the model identity and a hash of the texts.
        device: where the model runs; the model is moved there (and left there).
        progress: show a tqdm bar.

    Returns:
        ``[T, d]`` float32 on the CPU, rows of unit norm.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("embed_texts got no texts")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("embed_texts expects a sequence of str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def build() -> dict[str, torch.Tensor]:
        dev = torch.device(device)
        out = []
        with (
            _inference(bundle.model, dev),
            tqdm(total=len(texts), desc="CLIP texts", unit="text", disable=not progress) as bar,
        ):
            for b0 in range(0, len(texts), batch_size):
                batch = texts[b0 : b0 + batch_size]
                tokens = bundle.tokenizer(batch).to(dev)
                out.append(_normalise(bundle.model.encode_text(tokens)))
                bar.update(len(batch))
        embeddings = torch.cat(out)
        _check_finite(embeddings, texts, "text")
        return {"embeddings": embeddings}

    if cache_path is None:
        return build()["embeddings"]
    return _cached_embeddings(cache_path, "clip_text_embeddings", bundle, len(texts), text_fingerprint(texts), build)


def _check_finite(embeddings: torch.Tensor, inputs: Sequence[str], kind: str) -> None:
    """Raise, naming the inputs, when CLIP made NaN or infinite embeddings (a broken model or input)."""
    bad = (~torch.isfinite(embeddings)).any(1).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(repr(inputs[i])[:120] for i in bad[:3])
        raise ValueError(
            f"CLIP {kind} embeddings of {len(bad)} of {len(inputs)} inputs are NaN or infinite, e.g. {shown}: "
            "check those inputs and the CLIP weights; nothing was cached"
        )


def _cached_embeddings(cache_path, kind: str, bundle: Any, count: int, inputs: str, build) -> torch.Tensor:
    """``build()``'s embeddings through the cache, keyed on the model and a fingerprint of the inputs."""
    key = {"kind": kind, "version": _CACHE_VERSION, "model": str(bundle.identity), "count": count, "inputs": inputs}
    return cached(cache_path, key, build)["embeddings"]
