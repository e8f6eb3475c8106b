"""Pillow rendering of Shapes-world scenes into small RGB images, byte-reproducibly.

Shapes are drawn on a canvas ``SUPERSAMPLE`` times larger and box-filtered down, which anti-aliases the
edges without any randomness. PNGs are encoded with fixed settings and no metadata chunks, so the same
scene always gives the same bytes.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

from misp.world.config import COLOR_RGB, GRID, SIZE_FRACTIONS, WorldConfig, parse_color
from misp.world.scene import Scene, WorldObject

SUPERSAMPLE = 4
"""Drawing-canvas scale factor before the box-filter downsample."""

PNG_COMPRESS_LEVEL = 6
"""Fixed zlib level, so the encoded bytes depend on the pixels only."""


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape of half-extent ``r`` centred at (cx, cy)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, obj: WorldObject, config: WorldConfig, canvas: int) -> None:
    cell = canvas / GRID
    index = config.positions.index(obj.position)
    row, col = divmod(index, GRID)
    extent = SIZE_FRACTIONS[obj.size] * cell
    # The jitter never pushes the object out of its cell.
    reach = min((cell - extent) / 2, config.jitter * cell)
    cx = (col + 0.5) * cell + obj.jitter_x * reach
    cy = (row + 0.5) * cell + obj.jitter_y * reach
    r = extent / 2
    fill = COLOR_RGB[obj.color]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)


def render_scene(scene: Scene, config: WorldConfig) -> Image.Image:
    """The scene as an ``image_size`` x ``image_size`` RGB image."""
    canvas = config.image_size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), parse_color(config.background))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        if not obj.hidden:  # the object in front of it covers it entirely
            _draw(draw, obj, config, canvas)
    return image.resize((config.image_size, config.image_size), Image.Resampling.BOX)


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with fixed settings and no metadata (no timestamps, no text chunks)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    return buf.getvalue()
