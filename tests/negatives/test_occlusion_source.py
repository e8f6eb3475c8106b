"""The occlude source (LPOI's negatives): nested, ranked occlusions of an object, for images of any size,
deterministic per (record, epoch, seed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from misp.batch import NegativeRef
from misp.negatives.occlusion import background_colour, occlude
from misp.negatives.sources import DrawContext, get_source, materialise

BG = (40, 40, 40)


def scene(size=(64, 48), boxes=((8, 8, 24, 20),), colours=((220, 30, 30),), mode="RGB") -> Image.Image:
    """A uniform background with filled rectangles (left, top, right, bottom)."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = BG
    for (left, t, r, b), c in zip(boxes, colours, strict=True):
        pixels[t:b, left:r] = c
    return Image.fromarray(pixels).convert(mode)


def hidden(original: Image.Image, occluded: Image.Image) -> np.ndarray:
    """[H, W] bool: the object pixels the occlusion turned into background."""
    a, b = np.asarray(original.convert("RGB")), np.asarray(occluded)
    return (a != b).any(-1)


def levels(image: Image.Image, seed: int, k: int, **kw) -> list[Image.Image]:
    return [occlude(image, torch.Generator().manual_seed(seed), j, k, **kw) for j in range(1, k + 1)]


def test_each_level_hides_more_of_the_object_and_the_last_removes_it():
    image = scene()
    object_pixels = (np.asarray(image) != BG).any(-1)
    masks = [hidden(image, x) for x in levels(image, seed=0, k=4)]
    for before, after in zip(masks, masks[1:], strict=False):
        assert (after >= before).all() and after.sum() > before.sum()  # nested, strictly growing
    assert (masks[-1] == object_pixels).all()  # level K: the object is gone, the rest untouched
    assert (np.asarray(levels(image, 0, 4)[-1]) == BG).all()
    # roughly j/K of the object at level j (whole patches: within a patch row of the ideal share)
    shares = [m.sum() / object_pixels.sum() for m in masks]
    assert shares == sorted(shares) and 0.1 < shares[0] < 0.45 and 0.6 < shares[2] < 0.95


@pytest.mark.parametrize(("size", "mode"), [((50, 37), "RGB"), ((37, 90), "L"), ((300, 200), "RGBA"), ((7, 5), "RGB")])
def test_images_of_any_size_and_mode_keep_their_size(size, mode):
    w, h = size
    image = scene(size, boxes=((w // 4, h // 4, w // 2 + 1, h // 2 + 1),), mode=mode)
    out = levels(image, seed=1, k=3)
    assert all(x.size == size and x.mode == "RGB" for x in out)
    assert hidden(image, out[-1]).any()


def test_the_occluded_object_is_drawn_per_seed_and_a_seed_always_gives_the_same_images():
    image = scene(boxes=((4, 4, 16, 16), (40, 24, 56, 40)), colours=((220, 30, 30), (30, 30, 220)))
    first = [np.asarray(x) for x in levels(image, seed=5, k=2)]
    again = [np.asarray(x) for x in levels(image, seed=5, k=2)]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    # over seeds, each of the two objects is the one removed (one object per list, never both)
    removed = set()
    for seed in range(12):
        last = hidden(image, levels(image, seed, k=2)[-1])
        left, right = last[:20, :20].any(), last[20:, 36:].any()
        assert left != right
        removed.add("left" if left else "right")
    assert removed == {"left", "right"}


def test_a_blank_image_and_a_bad_level_are_handled():
    blank = Image.new("RGB", (32, 32), BG)
    assert (np.asarray(occlude(blank, torch.Generator().manual_seed(0), 2, 2)) == BG).all()
    with pytest.raises(ValueError, match="level"):
        occlude(blank, torch.Generator().manual_seed(0), 3, 2)
    assert tuple(background_colour(np.asarray(scene()))) == BG


def test_the_source_draws_a_ranked_list_per_record_and_epoch(tmp_path: Path):
    source = get_source("occlude")
    assert source.ranked and source.proposal == "none" and source.draws_negatives
    context = DrawContext(ids=["a", "b"], k=3, seed=0, source="occlude")
    draws = source.draw(context, 0)
    assert [[r.index for r in refs] for refs in draws.refs] == [[1, 2, 3], [1, 2, 3]]
    assert all(r.levels == 3 and r.seed == refs[0].seed for refs in draws.refs for r in refs)
    assert draws.refs[0][0].seed != draws.refs[1][0].seed  # per record
    assert source.draw(context, 1).refs[0][0].seed != draws.refs[0][0].seed  # per epoch
    assert source.draw(context, 0).refs == draws.refs  # a function of (seed, epoch, id)
    assert torch.equal(draws.log_q, torch.zeros(2, 3))
    assert len({r.key() for r in draws.refs[0]}) == 3  # the levels are different images
    path = tmp_path / "p.png"
    scene().save(path)
    images = [materialise(r, path, Image.open) for r in draws.refs[0]]
    masks = [hidden(scene(), x) for x in images]
    assert all((b >= a).all() for a, b in zip(masks, masks[1:], strict=False)) and masks[-1].any()
    assert NegativeRef("crop", seed=3).key() == "crop:3"  # other sources' keys are as before
