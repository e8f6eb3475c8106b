"""Describing how one Shapes scene differs from another, to label difference pairs (SAE feature inspection).

``scene_difference(a, b)`` lists the attribute changes that turn scene ``a`` (e.g. a record's positive)
into scene ``b`` (e.g. one of its candidate negatives)::

    "color red->blue"    "shape circle->square"    "size small->large"    "position top->left"
    "+blue square"       "-red circle"

Objects are matched in two passes. First by name: an object whose '{color} {shape}' name occurs in
both scenes is the same object (names are unique within a scene), so a changed cell reads as a move
("position top->left") and a changed size as a resize. Then the remaining objects by grid cell: two
objects in the same cell that share their colour or their shape are one object with that attribute
changed ("color red->blue"); objects that share neither are a different object ("-red circle",
"+blue square"), since saying "color red->blue, shape circle->square" would invent an identity the two
have nothing of. Whatever is left is removed (in ``a`` only) or added (in ``b`` only).

``difference_kind(a, b)`` reduces the list to one coarse label: the kind of most of its changes.

``split_scenes(world_dir, split)`` recovers the full scenes of a written world's split (pool.jsonl,
test.jsonl and val.jsonl store object names only; positions and sizes come from re-running the seeded generator on
the manifest's config, checked against the names on disk).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from misp.world.config import SPLITS, WorldConfig
from misp.world.generate import load_world
from misp.world.scene import Scene, WorldObject, generate_scenes

SceneLike = Scene | Iterable[WorldObject] | Iterable[Mapping]
"""A ``Scene``, a sequence of ``WorldObject``, or the ``Scene.to_dicts`` form (pref ``meta["scene"]``)."""

KINDS: tuple[str, ...] = ("color", "shape", "size", "position", "added", "removed")
"""The kinds of single change, in the order ``scene_difference`` reports changes of one object."""

MIXED = "mixed"
"""``difference_kind`` when no kind covers more than half of the changes."""

SAME = "none"
"""``difference_kind`` of two scenes with no change (only render jitter may differ)."""


def _objects(scene: SceneLike, which: str) -> list[WorldObject]:
    items = scene.objects if isinstance(scene, Scene) else scene
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise TypeError(f"scene {which} must be a Scene or a list of objects, got {type(scene).__name__}")
    out: list[WorldObject] = []
    for i, item in enumerate(items):
        if isinstance(item, WorldObject):
            out.append(item)
        elif isinstance(item, Mapping):
            missing = [k for k in ("color", "shape", "size", "position") if k not in item]
            if missing:
                raise ValueError(f"scene {which}, object {i}: missing {missing} in {dict(item)!r}")
            out.append(WorldObject.from_dict(dict(item)))
        else:
            raise TypeError(f"scene {which}, object {i}: expected a WorldObject or a dict, got {type(item).__name__}")
    names = [o.name for o in out]
    cells = [o.position for o in out]
    if len(set(names)) != len(names):
        raise ValueError(f"scene {which} holds one object name twice: {names}")
    if len(set(cells)) != len(cells):
        raise ValueError(f"scene {which} holds two objects in one cell: {cells}")
    return out


def _changes(x: WorldObject, y: WorldObject) -> list[str]:
    """The attribute changes from ``x`` to ``y`` (the same object), in ``KINDS`` order."""
    return [f"{attr} {getattr(x, attr)}->{getattr(y, attr)}"
            for attr in ("color", "shape", "size", "position") if getattr(x, attr) != getattr(y, attr)]


def scene_difference(a: SceneLike, b: SceneLike) -> list[str]:
    """The changes that turn scene ``a`` into scene ``b``, one string each (see the module docstring).

    Args:
        a: the scene changed from (a ``Scene``, ``WorldObject`` list or ``to_dicts`` list).
        b: the scene changed to.

    Returns:
        Changes in ``a``'s object order (each object's attribute changes in color, shape, size, position
        order, or ``-name`` if it was removed), then ``+name`` for each object new in ``b``, in ``b``'s
        order. Empty when the scenes hold the same objects (render jitter is ignored).
    """
    objs_a, objs_b = _objects(a, "a"), _objects(b, "b")
    partner: dict[int, int] = {}
    names_b = {o.name: j for j, o in enumerate(objs_b)}
    for i, o in enumerate(objs_a):
        if o.name in names_b:
            partner[i] = names_b[o.name]
    taken = set(partner.values())
    cells_b = {o.position: j for j, o in enumerate(objs_b) if j not in taken}
    for i, o in enumerate(objs_a):
        j = cells_b.get(o.position)
        if i in partner or j is None:
            continue
        y = objs_b[j]
        if o.color == y.color or o.shape == y.shape:
            partner[i] = j
            taken.add(j)
    out: list[str] = []
    for i, o in enumerate(objs_a):
        out += _changes(o, objs_b[partner[i]]) if i in partner else [f"-{o.name}"]
    out += [f"+{o.name}" for j, o in enumerate(objs_b) if j not in taken]
    return out


def change_kind(change: str) -> str:
    """The kind (one of ``KINDS``) of one change string of ``scene_difference``."""
    if change.startswith("+"):
        return "added"
    if change.startswith("-"):
        return "removed"
    kind = change.split(" ", 1)[0]
    if kind not in KINDS or "->" not in change:
        raise ValueError(f"not a change of scene_difference: {change!r}")
    return kind


def difference_kind(a: SceneLike, b: SceneLike) -> str:
    """One coarse label for how ``b`` differs from ``a``: the kind of most of the changes.

    Returns:
        One of ``KINDS`` when that kind accounts for more than half of ``scene_difference(a, b)``
        (so a pure change, or e.g. two removals and one addition, which reads as "removed"),
        ``"mixed"`` when no kind does, and ``"none"`` when the scenes hold the same objects.
    """
    changes = scene_difference(a, b)
    if not changes:
        return SAME
    kind, count = Counter(change_kind(c) for c in changes).most_common(1)[0]
    return kind if 2 * count > len(changes) else MIXED


def split_scenes(world_dir: str | Path, split: str) -> list[Scene]:
    """The scenes of one split of a world written by ``write_world``, with every attribute.

    The seeded generator is re-run on the manifest's config; the result is checked against what the
    split's file stores (pref: ``meta["scene"]``; pool, test and val: ``objects`` names), so a world edited
    or written by another misp version fails loudly instead of being described wrongly.

    Args:
        world_dir: the world's folder (holding world.json).
        split: pref, pool, test or val (clip and sft files keep no per-scene objects to check against).
    """
    checked = {"pref": "pref.jsonl", "pool": "pool.jsonl", "test": "test.jsonl", "val": "val.jsonl"}
    if split not in checked:
        known = ", ".join(checked) if split in SPLITS else f"{', '.join(checked)} (splits: {SPLITS})"
        raise ValueError(f"split_scenes reads {known}; got {split!r}")
    world = Path(world_dir)
    # Contents are checked below, row by row against the regenerated scenes, which names the line.
    config = WorldConfig(**load_world(world, verify=False)["config"])
    scenes = generate_scenes(config, split)
    rows = [json.loads(line) for line in (world / checked[split]).read_text().splitlines() if line.strip()]
    if len(rows) != len(scenes):
        raise ValueError(f"{world / checked[split]} has {len(rows)} rows, its world.json config makes {len(scenes)}")
    for n, (row, scene) in enumerate(zip(rows, scenes, strict=True), start=1):
        stored = row["meta"]["scene"] if split == "pref" else row["objects"]
        mine = scene.to_dicts() if split == "pref" else scene.names
        if stored != mine:
            raise ValueError(
                f"{world / checked[split]} line {n}: stored objects {stored!r} differ from the regenerated "
                f"scene {mine!r}; the file was edited or written by another misp version"
            )
    return scenes
