"""The Shapes world: a seeded, procedural image-caption dataset that plays the role of COCO on a CPU.

``write_world(out_dir, WorldConfig(...))`` renders scenes of coloured shapes on a 3x3 grid, with a
co-occurrence bias in the sft split that teaches a language prior (the mechanism behind VLM
hallucination), and writes CLIP, SFT, preference, pool, test and val (captions, POPE, Shapes-MMVP, grounding)
files in the formats real data uses.
"""

from misp.world.config import BiasPair, WorldConfig
from misp.world.generate import load_world, read_manifest, write_world
from misp.world.grammar import (
    CAPTION_PROMPT,
    caption,
    object_names,
    parse_objects,
    question,
    vocabulary,
    words,
)
from misp.world.render import png_bytes, render_scene
from misp.world.scene import Scene, WorldObject, generate_scenes, make_scene, scene_from_dicts

__all__ = [
    "CAPTION_PROMPT",
    "BiasPair",
    "Scene",
    "WorldConfig",
    "WorldObject",
    "caption",
    "generate_scenes",
    "load_world",
    "make_scene",
    "object_names",
    "parse_objects",
    "png_bytes",
    "read_manifest",
    "question",
    "render_scene",
    "scene_from_dicts",
    "vocabulary",
    "words",
    "write_world",
]
