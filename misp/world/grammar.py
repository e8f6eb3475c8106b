"""The fixed grammar of the Shapes world: captions, questions, answers, parsing and the word vocabulary.

Captions are one sentence per object in reading order of the cells:
"a small red circle at the top left. a large blue square at the center."
Every text the world produces splits into the tokens of ``vocabulary`` under ``words``, so a word-level
tokenizer built from it never meets an unknown token on world data.
"""

from __future__ import annotations

import re

from misp.world.config import WorldConfig
from misp.world.scene import Scene, WorldObject

CAPTION_PROMPT = "describe the image."
"""The captioning prompt of sft, pref and test."""

YES = "yes"
NO = "no"

_TOKEN = re.compile(r"[a-z]+|[.?]")


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def sentence(obj: WorldObject) -> str:
    """One object's caption sentence: 'a small red circle at the top left.'"""
    return f"{article(obj.size)} {obj.size} {obj.color} {obj.shape} at the {obj.position}."


def caption(scene: Scene) -> str:
    """The scene's true caption: one sentence per object, in the scene's (reading) order."""
    return " ".join(sentence(o) for o in scene.objects)


def sentence_span(scene: Scene, name: str) -> tuple[int, int]:
    """``[start, end)`` character offsets, in ``caption(scene)``, of the sentence that names object ``name``."""
    start = 0
    for o in scene.objects:
        text = sentence(o)
        if o.name == name:
            return start, start + len(text)
        start += len(text) + 1
    raise ValueError(f"{name!r} is not in the scene {scene.names}")


def question(object_name: str) -> str:
    """The yes/no question about one object: 'is there a red circle in the image?'"""
    return f"is there {article(object_name)} {object_name} in the image?"


def attribute_question(obj: WorldObject, attribute: str) -> str:
    """A yes/no question that ``obj``'s ``attribute`` decides (Shapes-MMVP), in the world's own words.

    colour and shape: 'is there a red circle in the image?'; size: 'is there a large red circle in the
    image?'; position: 'is there a red circle at the top left?'. Every word is already in ``vocabulary``
    (the question and caption words), so a world's tokenizer reads these questions unchanged.
    """
    if attribute in ("color", "shape"):
        return question(obj.name)
    if attribute == "size":
        return f"is there {article(obj.size)} {obj.size} {obj.name} in the image?"
    if attribute == "position":
        return f"is there {article(obj.name)} {obj.name} at the {obj.position}?"
    raise ValueError(f"unknown attribute {attribute!r}; known: color, shape, size, position")


def answer(present: bool) -> str:
    return YES if present else NO


def object_names(config: WorldConfig) -> list[str]:
    """Every object name of the world ('{color} {shape}'), colour-major in config order: CHAIR's vocabulary."""
    return config.object_names()


def words(text: str) -> list[str]:
    """Word-level tokens of a world text: lowercase words and the punctuation '.' and '?'."""
    return _TOKEN.findall(text.lower())


def parse_objects(text: str, object_names: list[str]) -> list[str]:
    """Every mention of an object name in ``text``, in order of appearance (repeats kept).

    Case-insensitive and tolerant of the spacing a word-level tokenizer's decode produces (runs of
    spaces, 'circle .'); a name only matches as whole words, so 'red circles' or 'bred circle' do not.
    """
    if not object_names:
        return []
    by_key = {" ".join(n.lower().split()): n for n in object_names}
    # Longest first so a name that extends another wins the alternation.
    keys = sorted(by_key, key=lambda k: (-len(k), k))
    pattern = re.compile(
        r"(?<![a-z])(" + "|".join(r"\s+".join(map(re.escape, k.split(" "))) for k in keys) + r")(?![a-z])"
    )
    return [by_key[" ".join(m.group(1).split())] for m in pattern.finditer(text.lower())]


def vocabulary(config: WorldConfig) -> list[str]:
    """Sorted set of every token any prompt or response of the world can contain."""
    vocab: set[str] = set(words(CAPTION_PROMPT)) | {YES, NO, ".", "at", "the"}
    for size in config.sizes:
        vocab.update(words(f"{article(size)} {size}"))
    for position in config.positions:
        vocab.update(words(position))
    vocab.update(config.colors)
    vocab.update(config.shapes)
    for name in config.object_names():
        vocab.update(words(question(name)))
    return sorted(vocab)
