"""World format 6: object insert/remove counterfactuals with captions, partner scenes for the evaluation
splits, the new world files under configs/worlds/, and the default world kept byte for byte."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageChops

from misp.world import WorldConfig, caption, load_world, parse_objects, png_bytes, render_scene, write_world
from misp.world.config import EVAL_SPLITS, GRID
from misp.world.describe import scene_difference
from misp.world.generate import (
    EDITS_VERSION,
    WORLD_VERSION,
    eval_file_key,
    partner_scenes,
    present_partner_cases,
)
from misp.world.grammar import sentence
from misp.world.scene import generate_scenes, make_scene, scene_from_dicts

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(n_clip=4, n_sft=20, n_pref=16, n_pool=4, n_test=12, n_val=8, image_size=24, test_counterfactuals=6,
             val_counterfactuals=4)
BASELINE_SMALL_TREE = "be93c4d0d08349a67de3df18fef29c24413e2b6201d8fdd95b4f90ca40e226e2"
"""One SHA-256 over every file (relative path and SHA-256 of its bytes, in path order; world.json included)
of the world that main's code at 41a965e (world format 5, before object edits) writes for SMALL."""


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(f"{p.relative_to(root)}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def default_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("default")
    write_world(out, WorldConfig(**SMALL), progress=False)
    return out


@pytest.fixture(scope="module")
def edits_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edits")
    write_world(out, WorldConfig(**SMALL, object_edits=2, partner_scenes=6), progress=False)
    return out


def test_the_default_world_is_byte_identical_to_format_5s(default_world):
    assert tree_hash(default_world) == BASELINE_SMALL_TREE
    manifest = load_world(default_world)
    assert manifest["version"] == WORLD_VERSION == 5
    assert "object_edits" not in manifest["config"] and "partner_present" not in manifest["counts"]


def test_edits_leave_every_format_5_file_but_pref_and_the_manifest_unchanged(default_world, edits_world):
    manifest = load_world(edits_world)
    assert manifest["version"] == EDITS_VERSION
    assert WorldConfig(**manifest["config"]) == WorldConfig(**SMALL, object_edits=2, partner_scenes=6)
    old = {str(p.relative_to(default_world)) for p in default_world.rglob("*") if p.is_file()}
    for rel in old - {"world.json", "pref.jsonl"}:
        assert (default_world / rel).read_bytes() == (edits_world / rel).read_bytes(), rel
    # pref.jsonl: the same records, plus meta["captioned_counterfactuals"].
    for a, b in zip(read_jsonl(default_world / "pref.jsonl"), read_jsonl(edits_world / "pref.jsonl"), strict=True):
        assert b["meta"].pop("captioned_counterfactuals") and a == b


def _cell_box(position: str, config: WorldConfig) -> tuple[int, int, int, int]:
    row, col = divmod(config.positions.index(position), GRID)
    cell = config.image_size / GRID
    return math.floor(col * cell), math.floor(row * cell), math.ceil((col + 1) * cell), math.ceil((row + 1) * cell)


def _changed_inside(a: Path, b: Path, box) -> bool:
    """The two images differ, and only inside ``box``."""
    diff = ImageChops.difference(Image.open(a).convert("RGB"), Image.open(b).convert("RGB"))
    bbox = diff.getbbox()
    return bbox is not None and box[0] <= bbox[0] and box[1] <= bbox[1] and bbox[2] <= box[2] and bbox[3] <= box[3]


def test_pref_counterfactuals_each_carry_their_own_true_caption(edits_world):
    config = WorldConfig(**SMALL, object_edits=2)
    partners_seen = Counter()
    for rec in read_jsonl(edits_world / "pref.jsonl"):
        scene = scene_from_dicts(rec["meta"]["scene"], config)
        entries = rec["meta"]["captioned_counterfactuals"]
        attribute, objects = entries[: len(rec["meta"]["counterfactuals"])], entries[len(rec["meta"]["counterfactuals"]):]
        # The one-attribute edits: the same images as before, each with the caption of its scene.
        for entry, path, dicts in zip(attribute, rec["meta"]["counterfactuals"], rec["meta"]["counterfactual_scenes"], strict=True):
            cf = scene_from_dicts(dicts, config)
            assert entry["image"] == path and entry["caption"] == caption(cf) and entry["caption"] != rec["chosen"]
            assert entry["edit"] == " ".join(scene_difference(scene, cf)) and not entry["partner"]
        assert len(objects) == 2
        missing = {p.partner for p in config.bias() if p.trigger in scene.names and p.partner not in scene.names}
        present = {p.partner for p in config.bias() if p.trigger in scene.names and p.partner in scene.names}
        for k, entry in enumerate(objects):
            name = entry["edit"][1:]
            start, end = entry["span"]
            assert entry["partner"] == (name in missing | present)
            partners_seen[entry["edit"][0]] += entry["partner"]
            if k == 0 and (missing or present):
                assert entry["partner"]  # the bias pair's own edit comes first
            if entry["edit"].startswith("-"):
                gone = next(o for o in scene.objects if o.name == name)
                edited = make_scene([o for o in scene.objects if o.name != name], config)
                assert entry["caption"] == caption(edited)
                assert rec["chosen"][start:end] == sentence(gone)
                # Exactly the render of the scene without that object.
                assert (edits_world / entry["image"]).read_bytes() == png_bytes(render_scene(edited, config))
            else:
                assert entry["edit"].startswith("+") and name not in scene.names
                assert sorted(parse_objects(entry["caption"], config.object_names())) == sorted([*scene.names, name])
                said = entry["caption"][start:end]
                assert name in said and said.endswith(".") and entry["caption"].replace(said, "").split() == rec["chosen"].split()
                position = said.split(" at the ")[1].rstrip(".")
                assert _changed_inside(edits_world / rec["image"], edits_world / entry["image"], _cell_box(position, config))
    assert partners_seen["-"] + partners_seen["+"] > 0


def test_partner_scenes_hold_a_pair_and_lead_with_its_partner_removal(edits_world):
    config = WorldConfig(**SMALL, object_edits=2, partner_scenes=6)
    manifest = load_world(edits_world)
    seen_ids = set()
    for split in EVAL_SPLITS:
        rows = read_jsonl(edits_world / f"{eval_file_key(split, 'edits')}.jsonl")
        assert len(rows) == 6 and manifest["files"][eval_file_key(split, "edits")]["rows"] == 6
        scenes = partner_scenes(config, split)
        for i, (row, scene) in enumerate(zip(rows, scenes, strict=True)):
            pair = config.bias()[i % len(config.bias())]
            assert {pair.trigger, pair.partner} <= set(row["objects"]) and row["objects"] == scene.names
            assert row["caption"] == caption(scene)
            assert (edits_world / row["image"]).read_bytes() == png_bytes(render_scene(scene, config))
            first = row["counterfactuals"][0]
            assert first["partner"] and first["edit"] == f"-{first['edit'][1:]}"
            assert first["edit"][1:] in {p.partner for p in config.bias()}
            start, end = first["span"]
            assert first["edit"][1:] in row["caption"][start:end]
            assert 1 < len(row["counterfactuals"]) <= 3
            assert {c["image"] for c in row["counterfactuals"]}.isdisjoint({row["image"]})
            seen_ids.add(row["id"])
        counts = manifest["counts"]["partner_present"][split]
        assert counts["partner_scenes"] == present_partner_cases(scenes, config) >= 6
        assert counts["split_scenes"] == present_partner_cases(generate_scenes(config, split), config)
        assert counts["cases"] == counts["split_scenes"] + counts["partner_scenes"]
        assert counts["partner_removals"] >= 6
    assert len(seen_ids) == 12  # test's and val's ids differ
    # The manifest's image hash covers the edits' images too.
    img = edits_world / read_jsonl(edits_world / "val_edits.jsonl")[0]["counterfactuals"][0]["image"]
    data = img.read_bytes()
    try:
        img.write_bytes(png_bytes(Image.new("RGB", (24, 24))))
        with pytest.raises(ValueError, match="images under"):
            load_world(edits_world)
    finally:
        img.write_bytes(data)


def test_partner_scenes_draw_their_other_objects_without_bias():
    config = WorldConfig(partner_scenes=3000)
    scenes = partner_scenes(config, "test")
    n_ids = len(config.object_names())
    for k, pair in enumerate(config.bias()):
        mine = scenes[k :: len(config.bias())]
        assert all(pair.trigger in s.names and pair.partner in s.names for s in mine)
        # Given n objects, the other n - 2 are a uniform subset of the other n_ids - 2 objects.
        expected = sum((len(s.objects) - 2) / (n_ids - 2) for s in mine) / len(mine)
        for name in config.object_names():
            if name in pair:
                continue
            p = sum(name in s.names for s in mine) / len(mine)
            assert abs(p - expected) < 4 * math.sqrt(expected * (1 - expected) / len(mine)), (name, p, expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"partner_scenes": -1}, "partner_scenes"), ({"object_edits": -1}, "object_edits"),
     ({"partner_scenes": 5, "bias_pairs": []}, "needs bias_pairs")],
)
def test_bad_edit_settings_raise_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**overrides)


@pytest.mark.parametrize("name", ["shapes_edits", "prism"])
def test_shipped_world_files_generate_with_100_partner_cases_per_split(name, tmp_path, capsys):
    from misp.cli import _run_world

    path = ROOT / "configs" / "worlds" / f"{name}.yaml"
    config = WorldConfig(**yaml.safe_load(path.read_text()))
    assert config.extended()
    for split in EVAL_SPLITS:  # at full size, counted without rendering
        own = present_partner_cases(generate_scenes(config, split), config)
        assert own + present_partner_cases(partner_scenes(config, split), config) >= 100
    small = ["--n_clip", "0", "--n_sft", "20", "--n_pref", "6", "--n_pool", "4", "--n_test", "10", "--n_val", "6",
             "--partner_scenes", "4", "--image_size", "32", "--quiet", "true"]
    _run_world(["--world", str(path), *small, "--out", str(tmp_path)])
    assert "test: " in capsys.readouterr().out
    manifest = load_world(tmp_path)
    assert manifest["version"] == EDITS_VERSION and manifest["counts"]["rows"]["val_edits"] == 4
    assert manifest["config"]["colors"] == config.colors and manifest["config"]["bias_pairs"] == config.bias_pairs
    if name == "prism":
        default = WorldConfig()
        assert set(config.colors).isdisjoint(default.colors) and set(config.shapes) != set(default.shapes)
        assert {p.trigger for p in config.bias()}.isdisjoint(p.trigger for p in default.bias())
