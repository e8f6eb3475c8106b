"""Scenes of the Shapes world and the random processes that make and edit them.

A scene is a tuple of objects in reading order of their grid cells. Sampling follows the bias rules of
``WorldConfig``: in the biased split (sft) a trigger brings its partner with probability
``bias_strength`` and excludes it otherwise; in every other split objects are drawn independently, with
triggers forced into a ``trigger_rate`` share of scenes and partners never forced.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, replace

from misp.world.config import BIASED_SPLITS, SPLITS, WorldConfig

ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")
"""The attributes of an object; a counterfactual changes exactly one of them."""


@dataclass(frozen=True)
class WorldObject:
    """One object: what it is (color, shape), how big, which cell, and a fixed render jitter."""

    color: str
    shape: str
    size: str
    position: str
    jitter_x: float = 0.0
    """Horizontal offset of the centre in [-1, 1], scaled by the config's jitter at render time."""
    jitter_y: float = 0.0
    """Vertical offset of the centre in [-1, 1]."""
    hidden: bool = False
    """Fully occluded by the visible object of the same cell: annotated (named in captions, answered
    'yes' to) but not visible in the pixels. See ``WorldConfig.hidden_partner_rate``."""

    @property
    def name(self) -> str:
        """The object's name in captions, POPE questions and CHAIR: '{color} {shape}'."""
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict:
        d = {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "jitter": [self.jitter_x, self.jitter_y],
        }
        if self.hidden:  # only written when set, so worlds without hidden objects keep their bytes
            d["hidden"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> WorldObject:
        jx, jy = d.get("jitter", (0.0, 0.0))
        return cls(
            d["color"], d["shape"], d["size"], d["position"], float(jx), float(jy), bool(d.get("hidden", False))
        )


@dataclass(frozen=True)
class Scene:
    """Objects in reading order of their cells; one visible object per cell (a hidden one may sit behind
    it, listed after it), names unique."""

    objects: tuple[WorldObject, ...]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.objects]

    def to_dicts(self) -> list[dict]:
        return [o.to_dict() for o in self.objects]


def make_scene(objects, config: WorldConfig) -> Scene:
    """A scene from objects in any order, checked against the world's rules and sorted into reading order."""
    objects = list(objects)
    cells = [o.position for o in objects if not o.hidden]
    for o in objects:
        config.split_name(o.name)
        if o.size not in config.sizes:
            raise ValueError(f"unknown size {o.size!r}; known: {config.sizes}")
        if o.position not in config.positions:
            raise ValueError(f"unknown position {o.position!r}; known: {config.positions}")
    if len(set(cells)) != len(cells):
        raise ValueError(f"two visible objects share a cell: {cells}")
    for o in objects:
        if o.hidden and o.position not in cells:
            raise ValueError(f"hidden {o.name!r} at {o.position!r} has no visible object in front of it")
    names = [o.name for o in objects]
    if len(set(names)) != len(names):
        raise ValueError(f"two identical (color, shape) objects in one scene: {names}")
    order = {p: i for i, p in enumerate(config.positions)}
    return Scene(tuple(sorted(objects, key=lambda o: (order[o.position], o.hidden))))


def scene_from_dicts(dicts: list[dict], config: WorldConfig) -> Scene:
    """Inverse of ``Scene.to_dicts``."""
    return make_scene([WorldObject.from_dict(d) for d in dicts], config)


def split_rng(seed: int, stream: str) -> random.Random:
    """An RNG for one named stream, independent of every other stream of the same seed."""
    digest = hashlib.sha256(f"misp-shapes-world/{seed}/{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _jitter(rng: random.Random) -> float:
    # Rounded so the value survives a JSON round trip exactly and re-renders byte-identically.
    return round(rng.uniform(-1.0, 1.0), 4)


def _new_object(name: str, cell: str, rng: random.Random, config: WorldConfig) -> WorldObject:
    color, shape = config.split_name(name)
    return WorldObject(color, shape, rng.choice(config.sizes), cell, _jitter(rng), _jitter(rng))


def sample_scene(rng: random.Random, config: WorldConfig, biased: bool) -> Scene:
    """Draw one scene; ``biased`` selects the sft rules (partner follows trigger) over independence."""
    pairs = config.bias()
    all_names = config.object_names()
    n = rng.randint(config.min_objects, config.max_objects)
    chosen: list[str] = []
    banned: set[str] = set()
    hidden: str | None = None
    if pairs and rng.random() < config.trigger_rate:
        pair = rng.choice(pairs)
        chosen.append(pair.trigger)
        if biased:
            if rng.random() < config.bias_strength:
                chosen.append(pair.partner)
                n = max(n, 2)
                if rng.random() < config.hidden_partner_rate:
                    hidden = pair.partner
            else:
                banned.add(pair.partner)
    if biased:
        # One trigger per sft scene, and only where forced, so that every trigger scene obeys the bias
        # draw exactly and P(partner | trigger) is bias_strength with no selection effect.
        banned.update(p.trigger for p in pairs)
    while len(chosen) < n:
        candidates = [o for o in all_names if o not in chosen and o not in banned]
        if not candidates:
            break
        chosen.append(rng.choice(candidates))
    visible = [name for name in chosen if name != hidden]
    cells = dict(zip(visible, rng.sample(config.positions, len(visible)), strict=True))
    objects = [_new_object(name, cells[name], rng, config) for name in visible]
    if hidden is not None:
        behind = replace(_new_object(hidden, cells[chosen[0]], rng, config), hidden=True)
        objects.append(behind)
    return make_scene(objects, config)


def generate_scenes(config: WorldConfig, split: str, n: int | None = None) -> list[Scene]:
    """The scenes of one split, from that split's own stream (so other splits' sizes never matter)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    n = config.split_sizes()[split] if n is None else n
    rng = split_rng(config.seed, f"scenes/{split}")
    biased = split in BIASED_SPLITS
    return [sample_scene(rng, config, biased) for _ in range(n)]


def free_cells(scene: Scene, config: WorldConfig) -> list[str]:
    used = {o.position for o in scene.objects}
    return [p for p in config.positions if p not in used]


def missing_partners(scene: Scene, config: WorldConfig) -> list[str]:
    """Partners of the scene's triggers that are absent from it, in bias-pair order."""
    names = set(scene.names)
    return [p.partner for p in config.bias() if p.trigger in names and p.partner not in names]


def _edits(scene: Scene, config: WorldConfig, attribute: str) -> list[tuple[int, str]]:
    """Every (object index, new value) that changes one attribute and keeps the scene valid."""
    names = set(scene.names)
    out: list[tuple[int, str]] = []
    for i, o in enumerate(scene.objects):
        if attribute == "color":
            out += [(i, c) for c in config.colors if c != o.color and f"{c} {o.shape}" not in names]
        elif attribute == "shape":
            out += [(i, s) for s in config.shapes if s != o.shape and f"{o.color} {s}" not in names]
        elif attribute == "size":
            out += [(i, s) for s in config.sizes if s != o.size]
        elif attribute == "position":
            out += [(i, p) for p in free_cells(scene, config)]
        else:
            raise ValueError(f"unknown attribute {attribute!r}; known: {ATTRIBUTES}")
    return out


def edit(scene: Scene, index: int, attribute: str, value: str, config: WorldConfig) -> Scene:
    """The scene with one attribute of object ``index`` set to ``value``."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **{attribute: value})
    return make_scene(objects, config)


def hallucinate(scene: Scene, rng: random.Random, config: WorldConfig) -> tuple[Scene, str, str]:
    """A scene with one realistic hallucination: ``(scene, type, hallucinated object name)``.

    If the scene holds a trigger whose partner is absent and a cell is free, the partner is added (the
    language prior's favourite mistake); otherwise one object's colour or shape is swapped to a value that
    names an object absent from the scene.
    """
    partners = missing_partners(scene, config)
    cells = free_cells(scene, config)
    if partners and cells:
        partner = rng.choice(partners)
        added = _new_object(partner, rng.choice(cells), rng, config)
        return make_scene([*scene.objects, added], config), "partner", partner
    options = {a: _edits(scene, config, a) for a in ("color", "shape")}
    attrs = [a for a in ("color", "shape") if options[a]]
    if not attrs:
        raise ValueError(
            f"cannot hallucinate in scene {scene.names}: no colour or shape swap gives an absent object"
        )
    attr = rng.choice(attrs)
    index, value = rng.choice(options[attr])
    obj = scene.objects[index]
    name = f"{value} {obj.shape}" if attr == "color" else f"{obj.color} {value}"
    return edit(scene, index, attr, value, config), "swap", name


def counterfactuals(scene: Scene, rng: random.Random, config: WorldConfig, k: int) -> list[Scene]:
    """Up to ``k`` distinct scenes, each with exactly one attribute of one object changed.

    The attribute is drawn uniformly among those that admit a change, then the (object, value) uniformly,
    so that colour, shape, size and position edits are equally common whatever the scene's free space.
    """
    options = {a: _edits(scene, config, a) for a in ATTRIBUTES}
    out: list[Scene] = []
    while len(out) < k:
        attrs = [a for a in ATTRIBUTES if options[a]]
        if not attrs:
            break
        attr = rng.choice(attrs)
        index, value = options[attr].pop(rng.randrange(len(options[attr])))
        out.append(edit(scene, index, attr, value, config))
    return out


def attribute_counterfactual(
    scene: Scene, attribute: str, rng: random.Random, config: WorldConfig
) -> tuple[int, str, Scene] | None:
    """One visible object of ``scene`` with ``attribute`` changed: ``(object index, new value, scene)``.

    Only edits that change the pixels of exactly one object are drawn: hidden objects are never edited
    (their change would not show), and an object with a hidden one behind it is never moved (moving it
    would reveal a second object). None when the scene admits no such edit of ``attribute``.
    """
    covering = {o.position for o in scene.objects if o.hidden}
    options = [
        (i, value)
        for i, value in _edits(scene, config, attribute)
        if not scene.objects[i].hidden and not (attribute == "position" and scene.objects[i].position in covering)
    ]
    if not options:
        return None
    index, value = rng.choice(options)
    return index, value, edit(scene, index, attribute, value, config)


# ---------------------------------------------------------------------------------------- object edits
@dataclass(frozen=True)
class ObjectEdit:
    """One object removed from a scene or one absent object inserted into it (``WorldConfig.object_edits``)."""

    kind: str
    """"remove" or "insert"."""
    object: WorldObject
    """The object removed (as it stood in the scene) or inserted (as it stands in the edited scene)."""
    partner: bool
    """The object is the partner of a trigger the scene holds (the co-occurrence bias's own edit)."""
    scene: Scene
    """The edited scene."""

    @property
    def label(self) -> str:
        """The edit in ``misp.world.describe.scene_difference``'s notation: '-blue square', '+blue square'."""
        return f"{'-' if self.kind == 'remove' else '+'}{self.object.name}"


def _removable(scene: Scene) -> list[int]:
    """Objects whose removal changes the pixels of that object alone and leaves at least one object:
    visible ones with nothing hidden behind them (removing the front one would reveal a second object)."""
    if len(scene.objects) < 2:
        return []
    covering = {o.position for o in scene.objects if o.hidden}
    return [i for i, o in enumerate(scene.objects) if not o.hidden and o.position not in covering]


def object_edits(scene: Scene, rng: random.Random, config: WorldConfig, k: int) -> list[ObjectEdit]:
    """Up to ``k`` distinct edits of ``scene``, each removing one object or inserting one absent object.

    The bias pairs' own edits come first: removing a present partner of a present trigger, then
    inserting a missing partner of a present trigger into a free cell (bias-pair order). The rest are
    drawn like ``counterfactuals``' attributes: the kind (remove or insert) uniformly among those still
    possible, then the object (and, for an insertion, the cell, size and jitter) uniformly.
    """
    names = set(scene.names)
    pairs = [p for p in config.bias() if p.trigger in names]
    removable = _removable(scene)
    partner_names = {p.partner for p in pairs}
    out: list[ObjectEdit] = []

    def remove(i: int) -> ObjectEdit:
        o = scene.objects[i]
        rest = [x for j, x in enumerate(scene.objects) if j != i]
        return ObjectEdit("remove", o, o.name in partner_names, make_scene(rest, config))

    def insert(name: str) -> ObjectEdit:
        added = _new_object(name, rng.choice(free_cells(scene, config)), rng, config)
        return ObjectEdit("insert", added, name in partner_names, make_scene([*scene.objects, added], config))

    for p in pairs:
        i = next((i for i in removable if scene.objects[i].name == p.partner), None)
        if i is not None and len(out) < k:
            out.append(remove(i))
            removable.remove(i)
    for p in pairs:
        if p.partner not in names and free_cells(scene, config) and len(out) < k:
            out.append(insert(p.partner))
    inserted = {e.object.name for e in out if e.kind == "insert"}
    absent = [n for n in config.object_names() if n not in names and n not in inserted and n not in partner_names]
    while len(out) < k:
        kinds = [kind for kind, ok in (("remove", removable), ("insert", absent and free_cells(scene, config))) if ok]
        if not kinds:
            break
        if rng.choice(kinds) == "remove":
            out.append(remove(removable.pop(rng.randrange(len(removable)))))
        else:
            out.append(insert(absent.pop(rng.randrange(len(absent)))))
    return out


def sample_pair_scene(rng: random.Random, config: WorldConfig, pair) -> Scene:
    """An unbiased-split scene that holds ``pair``'s trigger and partner, its other objects drawn as
    ``sample_scene`` draws them outside the biased split (uniformly among the rest, no hidden objects)."""
    n = max(2, rng.randint(config.min_objects, config.max_objects))
    chosen = [pair.trigger, pair.partner]
    while len(chosen) < n:
        candidates = [o for o in config.object_names() if o not in chosen]
        if not candidates:
            break
        chosen.append(rng.choice(candidates))
    cells = dict(zip(chosen, rng.sample(config.positions, len(chosen)), strict=True))
    return make_scene([_new_object(name, cells[name], rng, config) for name in chosen], config)
