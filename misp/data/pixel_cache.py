"""A bounded cache of preprocessed pixel tensors, so that an image file seen before is not decoded again.

Every epoch of the SFT stage decodes the same PNGs and runs the CLIP image processor on them again (about
an eighth of the stage, docs/performance.md section 4); the preference data does the same for each
record's positive and for pool negatives drawn again. :func:`image_inputs` (the one way a batch's images
are made) and :func:`pixel_values` look each image file up in a
:class:`PixelCache` first and decodes and preprocesses only the misses.

The cache is bounded in bytes, not unbounded, because it holds float32 pixels: a preprocessed LLaVA-1.5
image (3 x 336 x 336) is 1.3 MB, so 100k images would take 130 GB. Past the bound the least recently used
tensors are dropped (with an epoch-shuffled order the hit rate is then about bound / working set).

It lives in the process that collates, which with ``num_workers > 0`` is each DataLoader worker: every
worker fills a cache of its own (so the memory bound applies per worker), and the cache lasts as long as
the worker does. Pickling a cache (how a worker receives it when workers are spawned) hands over an
empty one with the same bound, never its contents.

Only file paths are cached, keyed by the path: an image made in memory (a crop or noising of the positive,
``misp.negatives.sources.materialise``) is not a file, is different every epoch, and is always
preprocessed afresh.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from misp.batch import ImageInputs
from misp.images import load_rgb
from misp.models.families import family_for_processor, takes_any_image_size
from misp.models.prompting import num_image_tokens, preprocess_images

ImageRef = str | os.PathLike | Image.Image
"""An image file (cacheable, by its path) or an image already in memory (never cached)."""


class PixelCache:
    """Least-recently-used map from an image file's path to its preprocessed pixels ``[3, H, W]``.

    Args:
        max_bytes: the memory bound on the tensors held; 0 turns the cache off (nothing is stored).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the pixel cache's bound must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        # The processor whose output the entries are: another one (a different image size or normalisation)
        # makes them wrong, so the cache empties itself rather than serve them.
        self._processor: Any = None

    @classmethod
    def from_mb(cls, mb: int) -> PixelCache:
        """A cache bounded at ``mb`` MiB (0: off)."""
        if mb < 0:
            raise ValueError(f"image_cache_mb must be >= 0 (0 turns the cache off), got {mb}")
        return cls(mb * 2**20)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry and reset the hit and miss counts."""
        self._entries.clear()
        self.nbytes = self.hits = self.misses = 0

    def use_processor(self, processor: Any) -> None:
        """Serve pixels made by ``processor``; a different processor from the last one empties the cache."""
        if processor is not self._processor:
            self.clear()
            self._processor = processor

    def get(self, key: str) -> torch.Tensor | None:
        """The cached pixels of ``key`` (marked most recently used), or None."""
        tensor = self._entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: str, pixels: torch.Tensor) -> None:
        """Keep ``pixels`` (one image's ``[3, H, W]``) under ``key``, dropping the oldest entries to fit.

        The tensor is copied: a row of a batch tensor would otherwise keep the whole batch's storage alive,
        and the caller may write into its batch.
        """
        size = pixels.numel() * pixels.element_size()
        if size > self.max_bytes:
            return  # also the "off" case: max_bytes == 0
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old.numel() * old.element_size()
        while self._entries and self.nbytes + size > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.numel() * dropped.element_size()
        self._entries[key] = pixels.detach().clone()
        self.nbytes += size

    def __getstate__(self) -> dict[str, Any]:
        # A worker process gets its own empty cache: copying the parent's tensors to every spawned worker
        # would cost more than it saves, and the bound is per process anyway.
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_bytes"])

    def __repr__(self) -> str:
        return (f"PixelCache({len(self)} images, {self.nbytes / 2**20:.1f} of {self.max_bytes / 2**20:.0f} MiB, "
                f"{self.hits} hits, {self.misses} misses)")


def pixel_values(
    processor: ProcessorMixin, images: Sequence[ImageRef], cache: PixelCache | None = None
) -> torch.Tensor | ImageInputs:
    """The processor's pixel values ``[N, 3, H, W]`` of ``images``, in order, reusing ``cache`` for files
    (for a dynamic-resolution family, whose images differ in patch count: its ``ImageInputs``, uncached).

    A path found in the cache is neither decoded nor preprocessed; the other paths are decoded with
    ``load_rgb`` and, with the in-memory images, preprocessed in one processor call (as a batch was before
    the cache), then the files' rows are cached. The values are bitwise those of ``preprocess_images``
    on the decoded images: the processor treats each image on its own (tests/data/test_pixel_cache.py).

    Args:
        processor: the model's processor (its ``image_processor`` makes the pixels).
        images: image files (``str`` or path) and PIL images, in the batch's order.
        cache: where files' pixels are kept between calls; None or a cache bounded at 0 caches nothing.

    Raises:
        ValueError: ``images`` is empty.
        FileNotFoundError, misp.images.ImageReadError: an image file is missing or cannot be decoded.
    """
    if not images:
        raise ValueError("pixel_values needs at least one image")
    if takes_any_image_size(processor):
        # Dynamic resolution: each image has its own patch count and grid, prepared by the family (uncached).
        family = family_for_processor(processor)
        return family.prepare_images(processor, [ref if isinstance(ref, Image.Image) else load_rgb(ref) for ref in images])
    if cache is not None and not cache.enabled:
        cache = None
    if cache is not None:
        cache.use_processor(processor)
    rows: list[torch.Tensor | None] = [None] * len(images)
    todo: list[int] = []
    decoded: list[Image.Image] = []
    for i, ref in enumerate(images):
        if isinstance(ref, Image.Image):
            todo.append(i)
            decoded.append(ref)
            continue
        if cache is not None and (hit := cache.get(os.fspath(ref))) is not None:
            rows[i] = hit
            continue
        todo.append(i)
        decoded.append(load_rgb(ref))
    if not todo:
        return torch.stack(rows)  # type: ignore[arg-type]  # every row is a hit; stack copies them out
    fresh = preprocess_images(processor, decoded)
    if len(todo) == len(images):
        out = fresh  # nothing cached in this batch: the processor's own tensor, exactly as before
    else:
        out = torch.empty((len(images), *fresh.shape[1:]), dtype=fresh.dtype)
        hit_rows = [i for i, r in enumerate(rows) if r is not None]
        out[hit_rows] = torch.stack([rows[i] for i in hit_rows])  # type: ignore[misc]
        out[todo] = fresh
    if cache is not None:
        for j, i in enumerate(todo):
            ref = images[i]
            if not isinstance(ref, Image.Image):
                cache.put(os.fspath(ref), fresh[j])
    return out



def image_inputs(processor: ProcessorMixin, images: Sequence[ImageRef], cache: PixelCache | None = None) -> ImageInputs:
    """A batch's images as the model takes them: the one function every preference batch is built by.

    LLaVA-style processors: ``tensors={"pixel_values": [U, 3, H, W]}`` (:func:`pixel_values`, reusing
    ``cache`` for files) and every image ``num_image_tokens(processor)`` tokens long (a fixed count).
    Dynamic-resolution families: what the family's ``prepare_images`` makes (uncached).

    Args:
        processor: the model's processor.
        images: image files and PIL images, in the batch's order (positives, then negatives).
        cache: where files' pixels are kept between calls (None: nothing cached).
    """
    values = pixel_values(processor, images, cache)
    if isinstance(values, ImageInputs):
        return values
    tokens = torch.full((len(images),), num_image_tokens(processor), dtype=torch.long)
    return ImageInputs({"pixel_values": values}, tokens)
