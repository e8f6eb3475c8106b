"""LPOI's negatives: K progressively occluded versions of the positive, ranked by how much of an object they hide.

LPOI (Pesaran Zadeh et al., ACL 2025) masks a key object and builds a list of images in which the masked
share of the object grows, 25%, 50%, 75%, 100% for a list of four; its released code reads these images
from a download (``ours_cmask_until25`` ... ``until100``) and publishes no code that makes them. Preference
records carry no object boxes (the Shapes world's name objects and their grid cells; published sets carry
nothing), so misp finds the object from the pixels and occludes it by growing patches (method.md 9.3):

1. the image is cut into square patches, ``grid`` along its shorter side (any size and aspect ratio);
2. a pixel is foreground where it differs from the background colour (the median of the border pixels)
   by more than ``tolerance`` in some channel; each patch gets its foreground share;
3. a seed patch is drawn with probability proportional to that share (uniformly on a blank image);
4. the region is the seed's 8-connected component of patches holding foreground (the object as far as
   the pixels tell), ordered by distance from the seed, capped at ``max_area`` of the image;
5. level j of K fills the first ``ceil(j |region| / K)`` patches of that order with the background colour,
   so each level hides a superset of the one before and level K removes the region entirely.

Everything random is drawn from one ``torch.Generator`` seeded per (seed, epoch, record): all K levels of
a record share the seed patch and the order, and a resumed run makes the same images.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch
from PIL import Image


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """The per-channel median of an ``[H, W, 3]`` image's border pixels (the fill of a hidden patch)."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]], axis=0)
    return np.median(border, axis=0).round().astype(np.uint8)


def patch_size(width: int, height: int, grid: int) -> int:
    """Side of the square patches: ``grid`` of them span the shorter side (at least one pixel)."""
    return max(1, round(min(width, height) / grid))


def foreground_shares(pixels: np.ndarray, size: int, tolerance: float) -> np.ndarray:
    """``[ny, nx]`` share of each patch's pixels that differ from the background by more than ``tolerance``."""
    bg = background_colour(pixels).astype(np.int16)
    fg = (np.abs(pixels.astype(np.int16) - bg).max(axis=-1) > tolerance * 255).astype(np.float64)
    h, w = fg.shape
    ny, nx = math.ceil(h / size), math.ceil(w / size)
    padded = np.zeros((ny * size, nx * size))
    counts = np.zeros_like(padded)
    padded[:h, :w], counts[:h, :w] = fg, 1.0
    sums = padded.reshape(ny, size, nx, size).sum(axis=(1, 3))
    return sums / counts.reshape(ny, size, nx, size).sum(axis=(1, 3))


def occlusion_order(
    pixels: np.ndarray, generator: torch.Generator, grid: int = 16, tolerance: float = 0.1, max_area: float = 0.25
) -> list[tuple[int, int]]:
    """The patches ``(row, col)`` of the object region, in the order the occlusion grows over them.

    Args:
        pixels: ``[H, W, 3]`` uint8 image.
        generator: draws the seed patch and breaks distance ties.
        grid: patches along the shorter side.
        tolerance: the foreground threshold, a fraction of the 0-255 range.
        max_area: the largest share of the image's patches the region may hold.
    """
    size = patch_size(pixels.shape[1], pixels.shape[0], grid)
    shares = foreground_shares(pixels, size, tolerance)
    ny, nx = shares.shape
    weights = torch.from_numpy(shares.reshape(-1))
    if weights.sum() > 0:
        seed = int(torch.multinomial(weights, 1, generator=generator))
    else:
        seed = int(torch.randint(0, ny * nx, (1,), generator=generator))
    start = divmod(seed, nx)
    region, queue = {start}, deque([start])
    while queue:
        r, c = queue.popleft()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                nb = (r + dr, c + dc)
                if 0 <= nb[0] < ny and 0 <= nb[1] < nx and nb not in region and shares[nb] > 0:
                    region.add(nb)
                    queue.append(nb)
    cells = sorted(region)
    ties = torch.rand(len(cells), generator=generator).tolist()
    order = sorted(range(len(cells)), key=lambda i: ((cells[i][0] - start[0]) ** 2 + (cells[i][1] - start[1]) ** 2, ties[i]))
    cap = max(1, math.ceil(max_area * ny * nx))
    return [cells[i] for i in order[:cap]]


def occlude(
    image: Image.Image,
    generator: torch.Generator,
    level: int,
    levels: int,
    grid: int = 16,
    tolerance: float = 0.1,
    max_area: float = 0.25,
) -> Image.Image:
    """Occlusion level ``level`` of ``levels`` of ``image``: the first ``ceil(level |region| / levels)`` patches
    of :func:`occlusion_order` filled with the background colour.

    Args:
        image: the positive image (any size and mode; the result is RGB of the same size).
        generator: a generator in the same state for every level of one list (nested masks).
        level: 1 (least hidden) to ``levels`` (the region removed).
        levels: the list's length K.
        grid, tolerance, max_area: see :func:`occlusion_order`.
    """
    if not 1 <= level <= levels:
        raise ValueError(f"occlusion level must be in 1..{levels}, got {level}")
    pixels = np.asarray(image.convert("RGB")).copy()
    order = occlusion_order(pixels, generator, grid, tolerance, max_area)
    size = patch_size(pixels.shape[1], pixels.shape[0], grid)
    fill = background_colour(pixels)
    for r, c in order[: math.ceil(level * len(order) / levels)]:
        pixels[r * size : (r + 1) * size, c * size : (c + 1) * size] = fill
    return Image.fromarray(pixels, mode="RGB")
