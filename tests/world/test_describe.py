"""scene_difference / difference_kind on hand-made scenes, on the generator's own edits, and split_scenes."""

from __future__ import annotations

import json
import shutil

import pytest

from misp.world import WorldConfig, WorldObject, generate_scenes
from misp.world.describe import change_kind, difference_kind, scene_difference, split_scenes
from misp.world.scene import ATTRIBUTES, edit


def obj(color: str, shape: str, position: str, size: str = "small", jitter: float = 0.0) -> WorldObject:
    return WorldObject(color, shape, size, position, jitter, -jitter)


RED_CIRCLE = obj("red", "circle", "top")


@pytest.mark.parametrize(
    ("after", "changes", "kind"),
    [
        (obj("blue", "circle", "top"), ["color red->blue"], "color"),
        (obj("red", "square", "top"), ["shape circle->square"], "shape"),
        (obj("red", "circle", "top", size="large"), ["size small->large"], "size"),
        (obj("red", "circle", "left"), ["position top->left"], "position"),
        (obj("red", "circle", "bottom right", size="large"), ["size small->large", "position top->bottom right"], "mixed"),
        (obj("blue", "circle", "top", size="large"), ["color red->blue", "size small->large"], "mixed"),
    ],
)
def test_one_object_changed(after, changes, kind):
    assert scene_difference([RED_CIRCLE], [after]) == changes
    assert difference_kind([RED_CIRCLE], [after]) == kind


def test_added_and_removed_objects():
    blue = obj("blue", "square", "center")
    assert scene_difference([RED_CIRCLE], [RED_CIRCLE, blue]) == ["+blue square"]
    assert difference_kind([RED_CIRCLE], [RED_CIRCLE, blue]) == "added"
    assert scene_difference([RED_CIRCLE, blue], [blue]) == ["-red circle"]
    assert difference_kind([RED_CIRCLE, blue], [blue]) == "removed"


def test_an_object_sharing_nothing_with_the_one_in_its_cell_is_a_replacement():
    # blue square shares neither colour nor shape with the red circle it displaces: not "one object recoloured
    # and reshaped" but a removal and an addition (one each, so no kind has a majority).
    after = [obj("blue", "square", "top")]
    assert scene_difference([RED_CIRCLE], after) == ["-red circle", "+blue square"]
    assert difference_kind([RED_CIRCLE], after) == "mixed"


def test_a_same_named_object_is_matched_before_the_cell():
    # Matching by cell alone would read "color red->blue at top" and "+red circle"; the red circle moved.
    after = [obj("blue", "circle", "top"), obj("red", "circle", "left")]
    assert scene_difference([RED_CIRCLE], after) == ["position top->left", "+blue circle"]


def test_two_objects_swapping_cells_are_two_moves():
    a = [obj("red", "circle", "top"), obj("blue", "square", "left")]
    b = [obj("blue", "square", "top"), obj("red", "circle", "left")]
    assert scene_difference(a, b) == ["position top->left", "position left->top"]
    assert difference_kind(a, b) == "position"


def test_identical_objects_with_other_render_jitter_differ_in_nothing():
    a = [obj("red", "circle", "top", jitter=0.3), obj("green", "triangle", "center")]
    b = [obj("green", "triangle", "center", jitter=-0.5), obj("red", "circle", "top")]
    assert scene_difference(a, b) == []
    assert difference_kind(a, b) == "none"


def test_the_kind_is_the_majority_of_the_changes():
    a = [obj("red", "circle", "top"), obj("green", "triangle", "center")]
    b = [obj("yellow", "square", "bottom")]
    assert scene_difference(a, b) == ["-red circle", "-green triangle", "+yellow square"]
    assert difference_kind(a, b) == "removed"
    assert [change_kind(c) for c in scene_difference(a, b)] == ["removed", "removed", "added"]


def test_the_difference_reversed_is_the_inverse_change():
    a = [obj("red", "circle", "top"), obj("green", "triangle", "center")]
    b = [obj("red", "square", "top"), obj("green", "triangle", "left", size="large"), obj("blue", "star", "right")]
    assert scene_difference(a, b) == ["shape circle->square", "size small->large", "position center->left", "+blue star"]
    assert scene_difference(b, a) == ["shape square->circle", "size large->small", "position left->center", "-blue star"]


def test_every_single_attribute_edit_of_a_scene_is_that_one_change():
    # Exhaustive over the generator's scenes: every valid edit of one attribute of one object (what the
    # world's counterfactual renders are) is described as exactly that change.
    config = WorldConfig(max_objects=4)
    vocab = {"color": config.colors, "shape": config.shapes, "size": config.sizes, "position": config.positions}
    n_edits = 0
    for scene in generate_scenes(config, "pref", n=25):
        for i, o in enumerate(scene.objects):
            for attr in ATTRIBUTES:
                for value in vocab[attr]:
                    old = getattr(o, attr)
                    if value == old:
                        continue
                    try:
                        after = edit(scene, i, attr, value, config)
                    except ValueError:  # the edit would duplicate a name or a cell
                        continue
                    assert scene_difference(scene, after) == [f"{attr} {old}->{value}"]
                    assert difference_kind(scene, after) == attr
                    n_edits += 1
    assert n_edits > 500


def test_scenes_dicts_and_object_lists_give_the_same_answer():
    config = WorldConfig()
    a, b = generate_scenes(config, "pool", n=2)
    expected = scene_difference(a, b)
    assert expected
    assert scene_difference(a.to_dicts(), list(b.objects)) == expected
    assert scene_difference(json.loads(json.dumps(a.to_dicts())), b) == expected


def test_bad_scenes_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="name twice"):
        scene_difference([RED_CIRCLE, obj("red", "circle", "left")], [])
    with pytest.raises(ValueError, match="one cell"):
        scene_difference([], [RED_CIRCLE, obj("blue", "square", "top")])
    with pytest.raises(ValueError, match="missing"):
        scene_difference([{"color": "red", "shape": "circle"}], [])
    with pytest.raises(TypeError, match="Scene or a list"):
        scene_difference("red circle", [])
    with pytest.raises(ValueError, match="not a change"):
        change_kind("red circle")


def test_split_scenes_recovers_the_full_pool_and_pref_scenes(tiny_world, tmp_path):
    pool = split_scenes(tiny_world, "pool")
    rows = [json.loads(line) for line in (tiny_world / "pool.jsonl").read_text().splitlines()]
    assert [s.names for s in pool] == [r["objects"] for r in rows]
    pref = split_scenes(tiny_world, "pref")
    records = [json.loads(line) for line in (tiny_world / "pref.jsonl").read_text().splitlines()]
    assert [s.to_dicts() for s in pref] == [r["meta"]["scene"] for r in records]
    with pytest.raises(ValueError, match="reads pref, pool, test"):
        split_scenes(tiny_world, "sft")
    val = split_scenes(tiny_world, "val")
    assert [s.names for s in val] == [json.loads(line)["objects"] for line in (tiny_world / "val.jsonl").read_text().splitlines()]

    # An edited pool file no longer matches the generator: refused, not silently described.
    listed = json.loads((tiny_world / "world.json").read_text())["files"].values()
    for name in ["world.json", *(f["path"] for f in listed)]:
        shutil.copy(tiny_world / name, tmp_path / name)
    rows[3]["objects"] = ["green star"]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="line 4"):
        split_scenes(tmp_path, "pool")
