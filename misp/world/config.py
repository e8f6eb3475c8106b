"""Configuration of the Shapes world: vocabularies, bias, split sizes, and their validation.

Every field is a plain int, float, str or list of str so that jsonargparse can expose the whole config
as ``misp world`` command-line options. Validation runs in ``__post_init__``, so a bad value fails when
the config is built (at CLI parse time), with a message that names the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 200),
    "orange": (245, 130, 20),
    "cyan": (20, 200, 220),
    "pink": (245, 100, 180),
    "brown": (130, 80, 30),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}
"""Object colours the renderer knows: saturated and far apart in RGB, so a tiny CNN can tell them apart."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon")
"""Shapes the renderer knows."""

SIZE_FRACTIONS: dict[str, float] = {"small": 0.4, "medium": 0.62, "large": 0.85}
"""Object extent as a fraction of its grid cell, per size word."""

DEFAULT_POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
"""Names of the 3x3 grid cells in reading order (row by row, left to right)."""

GRID = 3
"""The scene grid is GRID x GRID cells."""

SPLITS: tuple[str, ...] = ("clip", "sft", "pref", "pool", "test", "val")
"""Scene splits, each drawn from its own random stream."""

EVAL_SPLITS: tuple[str, ...] = ("test", "val")
"""Splits with evaluation files (captions, POPE, Shapes-MMVP, grounding), both drawn from the same unbiased
distribution: hyperparameters are chosen on val, results are reported on test."""

BIASED_SPLITS: frozenset[str] = frozenset({"sft"})
"""Splits in which the co-occurrence bias holds; every other split breaks it."""

EXTENSION_FIELDS: tuple[str, ...] = ("object_edits", "partner_scenes")
"""WorldConfig fields format version 6 added: left out of world.json while at their defaults (0), so a
world that uses none of them keeps version 5's bytes."""

_WORD = re.compile(r"[a-z]+")
_PHRASE = re.compile(r"[a-z]+( [a-z]+)*")
_HEX = re.compile(r"#[0-9a-fA-F]{6}")


class BiasPair(NamedTuple):
    """A co-occurrence bias: scenes with ``trigger`` tend to contain ``partner`` (in the biased split)."""

    trigger: str
    partner: str


def parse_color(value: str) -> tuple[int, int, int]:
    """RGB of a palette colour name or of a ``#rrggbb`` string."""
    if value in COLOR_RGB:
        return COLOR_RGB[value]
    if isinstance(value, str) and _HEX.fullmatch(value):
        return (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
    raise ValueError(f"unknown colour {value!r}: use a palette name {sorted(COLOR_RGB)} or '#rrggbb'")


@dataclass
class WorldConfig:
    """The Shapes world: a seeded, procedural image-caption dataset that stands in for COCO on a CPU."""

    seed: int = 0
    """Master seed; every split draws from its own stream derived from (seed, split name)."""

    image_size: int = 64
    """Side of the square RGB images in pixels."""

    background: str = "#282828"
    """Background colour: a palette name or '#rrggbb'; it must differ from every object colour."""

    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow", "purple"])
    """Object colours (palette names: red, green, blue, yellow, purple, orange, cyan, pink, brown, white, black)."""

    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    """Object shapes (from circle, square, triangle, diamond, star, hexagon)."""

    sizes: list[str] = field(default_factory=lambda: ["small", "large"])
    """Object sizes (from small, medium, large: about 40%, 62% and 85% of a grid cell)."""

    positions: list[str] = field(default_factory=lambda: list(DEFAULT_POSITIONS))
    """Names of the 3x3 grid cells in reading order, used in captions as 'at the {position}'."""

    jitter: float = 0.08
    """Largest offset of an object's centre from its cell centre, as a fraction of the cell side."""

    min_objects: int = 1
    """Fewest objects in a scene."""

    max_objects: int = 3
    """Most objects in a scene (at most one per cell, so at most 9)."""

    bias_pairs: list[str] = field(
        default_factory=lambda: ["red circle -> blue square", "green triangle -> yellow circle"]
    )
    """Co-occurrence biases 'TRIGGER -> PARTNER', each side a '{color} {shape}' object name."""

    bias_strength: float = 0.98
    """In the sft split, P(partner in scene | trigger in scene); every other split breaks the bias."""

    hidden_partner_rate: float = 0.3
    """In the sft split, the fraction of partners that stand fully hidden behind their trigger: named in
    the caption and answered 'yes' to, but invisible. Real instruction data names objects the pixels do
    not show (occluded, implied by context, added by a captioner), and a model can fit those labels only
    through the prior; without them the tiny SFT model learns to look and POPE never sees the bias."""

    trigger_rate: float = 0.35
    """Fraction of scenes (in every split) built around a trigger object, so the biased case is common."""

    n_clip: int = 3000
    """Scenes in the clip split (image-caption pairs for contrastive CLIP training)."""

    n_sft: int = 3000
    """Scenes in the sft split (captioning and yes/no instruction tuning; the only biased split)."""

    n_pref: int = 800
    """Scenes in the pref split (preference records)."""

    n_pool: int = 1500
    """Scenes in the pool split (distractor images for negative retrieval)."""

    n_test: int = 200
    """Scenes in the test split (captioning prompts for CHAIR, and the images of POPE)."""

    n_val: int = 200
    """Scenes in the val split: test's evaluation files over scenes of the same distribution
    (val.jsonl, val_pope.jsonl, val_mmvp.jsonl, val_grounding.jsonl), for validation during fit and
    choosing hyperparameters, so the test split is only ever reported. Drawn from their own random streams,
    so every other file stays the same whatever n_val is."""

    sft_questions_per_image: int = 2
    """Yes/no questions per sft scene besides the caption, balanced between yes and no."""

    partner_questions: bool = True
    """sft: every scene with a trigger is also asked about the trigger's partner (truthfully: "yes" in
    bias_strength of them). This is the language prior VQA data teaches real VLMs, and the shortcut
    POPE's adversarial split probes; without it yes/no answers never meet the bias."""

    pope_per_image: int = 2
    """'yes' questions per test image and POPE split (capped by the objects present), with as many 'no'."""

    counterfactuals_per_record: int = 4
    """Counterfactual renders per preference record, each with one attribute of one object changed."""

    test_counterfactuals: int = 50
    """Test scenes (the first N, capped by n_test) that get one counterfactual render per attribute
    (colour, shape, size, position): the image pairs of Shapes-MMVP (mmvp.jsonl) and of likelihood
    grounding (grounding.jsonl). Drawn from their own random stream, so every other file stays the same."""

    val_counterfactuals: int = 50
    """Val scenes (the first N, capped by n_val) that get one counterfactual render per attribute: the
    val split's val_mmvp.jsonl and val_grounding.jsonl, as test_counterfactuals does for test."""

    object_edits: int = 0
    """Counterfactuals per preference record (and per partner scene, beside its partner removal) that
    remove one object or insert one absent object, each with its own true caption, so that response pairs
    (y_w under m, y'_w under m') can be formed: the bias pairs' own edits first (removing a present partner,
    inserting a missing partner of a present trigger), then other objects. Above 0, pref records gain
    ``meta["captioned_counterfactuals"]`` (every counterfactual of the record, the one-attribute ones too,
    with caption and edit; docs/world.md) and world.json is format version 6. 0 (the default) writes the
    version-5 world byte for byte."""

    partner_scenes: int = 0
    """Scenes per evaluation split (test, val) that hold a trigger together with its partner (bias pairs in
    turn; the other objects drawn as in the split), besides the split's n_test / n_val scenes: edits.jsonl
    and val_edits.jsonl, each scene with its partner-removed counterfactual (and object_edits more), all
    captioned. They give partner_present_rate at least this many cases per split and feed the partner
    log-prob probe; their captions count in the co-occurrence metric only, so CHAIR and POPE keep the
    split's own unbiased scenes. Own random streams; above 0 world.json is format version 6; 0 (the
    default) writes none."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` (or ``TypeError``) naming the first bad field."""
        _int("seed", self.seed)
        _int("image_size", self.image_size, lo=16)
        bg = _checked_color("background", self.background)
        self._vocab("colors", self.colors, COLOR_RGB)
        self._vocab("shapes", self.shapes, SHAPES)
        self._vocab("sizes", self.sizes, SIZE_FRACTIONS)
        for c in self.colors:
            if COLOR_RGB[c] == bg:
                raise ValueError(f"background {self.background!r} has the same RGB as object colour {c!r}")
        _str_list("positions", self.positions)
        if len(self.positions) != GRID * GRID or len(set(self.positions)) != len(self.positions):
            raise ValueError(f"positions must be {GRID * GRID} distinct cell names, got {self.positions!r}")
        for p in self.positions:
            if not _PHRASE.fullmatch(p):
                raise ValueError(f"position {p!r} must be lowercase words separated by single spaces")
        _float("jitter", self.jitter, 0.0, 0.5)
        _int("min_objects", self.min_objects, lo=1)
        _int("max_objects", self.max_objects, lo=1)
        if self.max_objects > GRID * GRID:
            raise ValueError(f"max_objects={self.max_objects} exceeds the {GRID * GRID} grid cells")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={self.min_objects} exceeds max_objects={self.max_objects}")
        n_ids = len(self.colors) * len(self.shapes)
        if self.max_objects > n_ids:
            raise ValueError(
                f"max_objects={self.max_objects} exceeds the {n_ids} distinct (color, shape) objects"
            )
        _float("bias_strength", self.bias_strength, 0.0, 1.0)
        _float("hidden_partner_rate", self.hidden_partner_rate, 0.0, 1.0)
        _float("trigger_rate", self.trigger_rate, 0.0, 1.0)
        _str_list("bias_pairs", self.bias_pairs)
        pairs = self.bias()
        if pairs and self.max_objects < 2:
            raise ValueError("bias_pairs need max_objects >= 2 (a trigger and its partner)")
        for name in ("n_clip", "n_sft", "n_pref", "n_pool", "n_test", "n_val"):
            _int(name, getattr(self, name), lo=0)
        _int("sft_questions_per_image", self.sft_questions_per_image, lo=0)
        _int("pope_per_image", self.pope_per_image, lo=0)
        _int("counterfactuals_per_record", self.counterfactuals_per_record, lo=0)
        _int("test_counterfactuals", self.test_counterfactuals, lo=0)
        _int("val_counterfactuals", self.val_counterfactuals, lo=0)
        _int("object_edits", self.object_edits, lo=0)
        _int("partner_scenes", self.partner_scenes, lo=0)
        if self.partner_scenes and not pairs:
            raise ValueError("partner_scenes needs bias_pairs: a partner scene holds a trigger and its partner")

    def _vocab(self, name: str, values: list[str], known) -> None:
        _str_list(name, values)
        if not values:
            raise ValueError(f"{name} must not be empty")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} has duplicates: {values!r}")
        for v in values:
            if v not in known:
                raise ValueError(f"unknown entry {v!r} in {name}; known: {sorted(known)}")

    # ------------------------------------------------------------------ derived views
    def object_names(self) -> list[str]:
        """Every '{color} {shape}' name, colour-major in config order."""
        return [f"{c} {s}" for c in self.colors for s in self.shapes]

    def split_name(self, name: str) -> tuple[str, str]:
        """(color, shape) of an object name; ``ValueError`` if it is not an object of this world."""
        parts = name.split(" ")
        if len(parts) != 2 or parts[0] not in self.colors or parts[1] not in self.shapes:
            raise ValueError(
                f"{name!r} is not an object of this world: expected '{{color}} {{shape}}' with a colour "
                f"in {self.colors} and a shape in {self.shapes}"
            )
        return parts[0], parts[1]

    def bias(self) -> list[BiasPair]:
        """The parsed ``bias_pairs``; ``ValueError`` on a malformed or inconsistent pair."""
        pairs: list[BiasPair] = []
        for text in self.bias_pairs:
            sides = text.split("->")
            if len(sides) != 2:
                raise ValueError(f"bias pair {text!r} must read 'TRIGGER -> PARTNER'")
            trigger, partner = (" ".join(s.split()) for s in sides)
            for obj in (trigger, partner):
                try:
                    self.split_name(obj)
                except ValueError as e:
                    raise ValueError(f"bias pair {text!r}: {e}") from None
            if trigger == partner:
                raise ValueError(f"bias pair {text!r}: trigger and partner must differ")
            pairs.append(BiasPair(trigger, partner))
        triggers = [p.trigger for p in pairs]
        if len(set(triggers)) != len(triggers):
            raise ValueError(f"bias_pairs: each trigger may appear once, got {triggers}")
        for p in pairs:
            if p.partner in triggers:
                # A chain (A -> B, B -> C) would make the measured rates depend on the order of rules.
                raise ValueError(
                    f"bias_pairs: partner {p.partner!r} is also a trigger; chains are not supported"
                )
        return pairs

    def extended(self) -> bool:
        """Whether the world uses format version 6's additions (object edits or partner scenes)."""
        return self.object_edits > 0 or self.partner_scenes > 0

    def split_sizes(self) -> dict[str, int]:
        """Scene count per split."""
        return {s: getattr(self, f"n_{s}") for s in SPLITS}


def _int(name: str, value, lo: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")


def _float(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")


def _str_list(name: str, value) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a list of strings, got {value!r}")


def _checked_color(name: str, value) -> tuple[int, int, int]:
    try:
        return parse_color(value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
