"""The Shapes world: determinism, the co-occurrence bias, grammar round trips, POPE, preference records."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from misp.utils.io import sha256_file
from misp.world import (
    CAPTION_PROMPT,
    WorldConfig,
    caption,
    generate_scenes,
    load_world,
    parse_objects,
    png_bytes,
    question,
    render_scene,
    scene_from_dicts,
    vocabulary,
    words,
    write_world,
)
from misp.world.generate import EVAL_KINDS, MANIFEST, eval_file_key, image_path
from misp.world.scene import ATTRIBUTES, WorldObject, make_scene, missing_partners

SMALL = dict(n_clip=12, n_sft=40, n_pref=30, n_pool=10, n_test=40, n_val=24, image_size=40)

V4_FILES = {
    "clip.jsonl": "975317c07eb0e59df83eb40abefad9013a5e8774d93b50c3bbe7232c3e844bdf",
    "sft.jsonl": "c7a73e8d39a6fcbd6f7310fbfe5e9f1697442dd002ec60ef66b80641ab037cd4",
    "pref.jsonl": "204652e6b6c150e662ffb0ce5ba01a476ace5a9626facdec24177169a2db0426",
    "pool.jsonl": "a7182914dfbc2086a2ba8ba13d5f2dfd8fc06a984049fe5552c8ad247f862f46",
    "test.jsonl": "de2f019a2dd8f600a2af1f2d1fa6a906eae363a794e83257e6fe03127acc75e1",
    "pope.jsonl": "73f00e203f074c441dfa30cb67350435306f21b82ec40b8c9bc17dd7dcd7ed76",
    "mmvp.jsonl": "d441bb7d37d6ebd66a30cb9139623048e893beadb84cf8ee388e918e48c8fa27",
    "grounding.jsonl": "1dd923b153cb5c62eb89fd5bac2814b94a372fee6759fd31eabda57986adc5ab",
}
"""SHA-256 of the JSON Lines files WORLD_VERSION 4's code (commit 3b4dc1f) wrote for SMALL (without n_val, which
it did not know): version 5 adds the val split and must leave every one of them byte for byte."""


def small_config(**overrides) -> WorldConfig:
    return WorldConfig(**{**SMALL, **overrides})


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, small_config(), progress=False)
    return out


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_byte_identical_files(world, tmp_path):
    write_world(tmp_path, small_config(), progress=False)
    a, b = file_hashes(world), file_hashes(tmp_path)
    assert a == b
    # Every scene image and counterfactual is there, and no temporary file was left behind.
    manifest = load_world(world)
    assert sum(k.endswith(".png") for k in a) == manifest["counts"]["images"]
    assert not [k for k in a if k.endswith(".tmp")]


def test_different_seed_differs(world, tmp_path):
    write_world(tmp_path, small_config(seed=1), progress=False)
    a, b = file_hashes(world), file_hashes(tmp_path)
    # Which attributes of a test or val scene admit a visible change depends on the scene, so their
    # counterfactuals' names may differ between seeds; every other name is fixed by the config.
    fixed = lambda keys: {k for k in keys if not k.startswith(("images/test_cf/", "images/val_cf/"))}  # noqa: E731
    assert fixed(a) == fixed(b)
    for name in ["clip", "sft", "pref", "pool"] + [eval_file_key(s, k) for s in ("test", "val") for k in EVAL_KINDS]:
        name = f"{name}.jsonl"
        assert a[name] != b[name]
    images = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b[k] for k in images) > 0.9 * len(images)


def test_changing_one_split_size_leaves_the_others_unchanged(world, tmp_path):
    write_world(tmp_path, small_config(n_pool=23, n_clip=5), progress=False)
    a, b = file_hashes(world), file_hashes(tmp_path)
    for name in ("sft.jsonl", "pref.jsonl", "test.jsonl", "pope.jsonl"):
        assert a[name] == b[name]
    assert a["pool.jsonl"] != b["pool.jsonl"]
    # The first pool scenes are a prefix of the longer pool's.
    assert read_jsonl(world / "pool.jsonl") == read_jsonl(tmp_path / "pool.jsonl")[:10]


def test_rendering_is_reproducible_and_sized(world):
    config = small_config()
    for rec in read_jsonl(world / "pref.jsonl"):
        scene = scene_from_dicts(rec["meta"]["scene"], config)
        assert png_bytes(render_scene(scene, config)) == (world / rec["image"]).read_bytes()
    for path in (world / "images").rglob("*.png"):
        with Image.open(path) as im:
            assert im.size == (40, 40) and im.mode == "RGB"
            assert not im.info  # no metadata chunks
    scene = make_scene([WorldObject("red", "circle", "large", "center")], WorldConfig(image_size=64))
    image = render_scene(scene, WorldConfig(image_size=64))
    assert image.size == (64, 64)
    # The large red circle fills the centre cell and leaves the corners background.
    assert image.getpixel((32, 32)) == (220, 30, 30)
    assert image.getpixel((2, 2)) == (0x28, 0x28, 0x28)


# ------------------------------------------------------------------------------------ the bias
def _partner_given_trigger(scenes, pair):
    hits = [pair.partner in s.names for s in scenes if pair.trigger in s.names]
    return sum(hits) / len(hits), len(hits)


def test_sft_partner_follows_trigger_at_bias_strength():
    config = WorldConfig(n_sft=4000)
    scenes = generate_scenes(config, "sft")
    for pair in config.bias():
        p, n = _partner_given_trigger(scenes, pair)
        se = math.sqrt(config.bias_strength * (1 - config.bias_strength) / n)
        assert n > 400
        assert abs(p - config.bias_strength) < 4 * se, (pair, p, n)
    weak = WorldConfig(n_sft=3000, bias_strength=0.3)
    for pair in weak.bias():
        p, n = _partner_given_trigger(generate_scenes(weak, "sft"), pair)
        assert abs(p - 0.3) < 4 * math.sqrt(0.21 / n)


@pytest.mark.parametrize("split", ["test", "val", "pref", "clip", "pool"])
def test_other_splits_break_the_bias(split):
    config = WorldConfig()
    scenes = generate_scenes(config, split, n=4000)
    n_ids = len(config.object_names())
    for pair in config.bias():
        with_t = [s for s in scenes if pair.trigger in s.names]
        p, n = _partner_given_trigger(scenes, pair)
        # Independence: given the trigger and n objects, the other n-1 are a uniform subset of the other
        # n_ids-1 objects, so P(partner | trigger) = E[(n-1)/(n_ids-1) | trigger].
        expected = sum((len(s.objects) - 1) / (n_ids - 1) for s in with_t) / n
        assert abs(p - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (pair, p, expected)
        assert p < 0.25 < config.bias_strength
        # Triggers are still forced into about trigger_rate of the scenes.
        assert n / len(scenes) > config.trigger_rate / len(config.bias())


def test_manifest_statistics_match_files(world):
    manifest = load_world(world)
    config = WorldConfig(**manifest["config"])
    assert config == small_config()
    sft = generate_scenes(config, "sft")
    for pair in config.bias():
        key = f"{pair.trigger} -> {pair.partner}"
        p, n = _partner_given_trigger(sft, pair)
        stats = manifest["statistics"]["sft"]["bias"][key]
        assert stats["trigger_scenes"] == n and stats["partner_given_trigger"] == pytest.approx(p)
        assert manifest["cooccurrence"][pair.trigger][0]["object"] == pair.partner
    for name, f in manifest["files"].items():
        assert len(read_jsonl(world / f["path"])) == f["rows"] == manifest["counts"]["rows"][name]
        assert sha256_file(world / f["path"]) == f["sha256"]
    assert manifest["objects"] == config.object_names()


# ------------------------------------------------------------------------------------ grammar
def test_captions_parse_back_to_the_scene_objects(world):
    config = small_config()
    names = config.object_names()
    for rec in read_jsonl(world / "pref.jsonl"):
        assert parse_objects(rec["chosen"], names) == rec["meta"]["objects"]
    for scene in generate_scenes(config, "clip", n=200):
        text = caption(scene)
        assert parse_objects(text, names) == scene.names
        # What a word-level tokenizer's decode gives back: spaces around punctuation, odd case.
        decoded = "  ".join(words(text)).upper()
        assert parse_objects(decoded, names) == scene.names


def test_parse_objects_edge_cases():
    names = WorldConfig().object_names()
    text = "A red circle. a  red\tcircle . bred circle red circles blue square ?"
    assert parse_objects(text, names) == ["red circle", "red circle", "blue square"]
    assert parse_objects("nothing here", names) == []


def test_caption_format_and_reading_order():
    config = WorldConfig()
    scene = make_scene(
        [WorldObject("blue", "square", "large", "center"), WorldObject("red", "circle", "small", "top left")],
        config,
    )
    assert caption(scene) == "a small red circle at the top left. a large blue square at the center."
    assert question("red circle") == "is there a red circle in the image?"


def test_vocabulary_is_exactly_the_tokens_of_every_world_text(world):
    config = small_config()
    vocab = vocabulary(config)
    assert vocab == sorted(set(vocab))
    # Brute force over every possible sentence, question and fixed text.
    texts = [CAPTION_PROMPT, "yes", "no"] + [question(n) for n in config.object_names()]
    for color, shape, size, pos in itertools.product(
        config.colors, config.shapes, config.sizes, config.positions
    ):
        texts.append(caption(make_scene([WorldObject(color, shape, size, pos)], config)))
    assert sorted({w for t in texts for w in words(t)}) == vocab
    # And every text actually written is covered.
    for name, keys in [
        ("clip", ["caption"]),
        ("sft", ["prompt", "response"]),
        ("test", ["prompt"]),
        ("pref", ["prompt", "chosen", "rejected"]),
        ("pope", ["question", "label"]),
    ]:
        for rec in read_jsonl(world / f"{name}.jsonl"):
            for k in keys:
                assert set(words(rec[k])) <= set(vocab)
    assert load_world(world)["vocabulary"] == vocab


def test_sft_rows_are_a_caption_balanced_questions_and_partner_questions(world):
    rows = read_jsonl(world / "sft.jsonl")
    config = small_config()
    partner_of = {p.trigger: p.partner for p in config.bias()}
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    assert len(by_image) == config.n_sft
    labels = Counter()
    partner_answers = Counter()
    for group in by_image.values():
        assert group[0]["prompt"] == CAPTION_PROMPT
        present = set(parse_objects(group[0]["response"], config.object_names()))
        balanced = group[1 : 1 + config.sft_questions_per_image]
        extra = group[1 + config.sft_questions_per_image :]
        for q in group[1:]:
            (obj,) = parse_objects(q["prompt"], config.object_names())
            assert q["response"] == ("yes" if obj in present else "no")
        for q in balanced:
            labels[q["response"]] += 1
        # One extra question per present trigger, about its partner, answered truthfully.
        expected = [partner_of[t] for t in partner_of if t in present]
        assert [parse_objects(q["prompt"], config.object_names())[0] for q in extra] == expected
        partner_answers.update(q["response"] for q in extra)
    assert labels["yes"] == labels["no"] == config.n_sft
    # In the biased split the partner question is mostly "yes": the prior POPE-adversarial probes.
    assert partner_answers["yes"] > 3 * partner_answers["no"] and partner_answers["yes"] > 0


# ------------------------------------------------------------------------------------ POPE
@pytest.mark.parametrize("split", ["test", "val"])
def test_pope_labels_and_splits(world, split):
    config = small_config()
    names = config.object_names()
    truth = {r["image"]: set(r["objects"]) for r in read_jsonl(world / f"{split}.jsonl")}
    # Both splits' negatives follow the sft split's frequencies: the prior the model learnt.
    sft_caps = [r["response"] for r in read_jsonl(world / "sft.jsonl") if r["prompt"] == CAPTION_PROMPT]
    freq = Counter(n for c in sft_caps for n in set(parse_objects(c, names)))
    rows = read_jsonl(world / f"{eval_file_key(split, 'pope')}.jsonl")
    assert {r["image"] for r in rows} == set(truth) and all(r["image"].startswith(f"images/{split}/") for r in rows)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        assert r["label"] == ("yes" if r["object"] in truth[r["image"]] else "no")
        assert r["question"] == question(r["object"])
        groups.setdefault((r["split"], r["image"]), []).append(r)
    assert {s for s, _ in groups} == {"random", "popular", "adversarial"}
    partner_checks = 0
    for (split, img), group in groups.items():
        yes = [r["object"] for r in group if r["label"] == "yes"]
        no = [r["object"] for r in group if r["label"] == "no"]
        assert len(yes) == len(no) == min(config.pope_per_image, len(truth[img]))
        assert len(set(no)) == len(no)
        absent = [n for n in names if n not in truth[img]]
        if split == "popular":
            ranked = sorted(absent, key=lambda n: (-freq[n], names.index(n)))
            assert sorted(no) == sorted(ranked[: len(no)])
        if split == "adversarial":
            for pair in config.bias():
                if pair.trigger in truth[img] and pair.partner not in truth[img]:
                    assert pair.partner in no
                    partner_checks += 1
    assert partner_checks >= 3  # the fixture's test and val splits have trigger images without their partner


# ------------------------------------------------------------------------------------ preference records
def _sentences(text: str) -> list[str]:
    return [s.strip() for s in text.split(".") if s.strip()]


def test_rejected_has_exactly_one_hallucinated_object(world):
    config = small_config()
    names = config.object_names()
    kinds = Counter()
    for rec in read_jsonl(world / "pref.jsonl"):
        scene = scene_from_dicts(rec["meta"]["scene"], config)
        assert rec["prompt"] == CAPTION_PROMPT and rec["chosen"] == caption(scene)
        chosen, rejected = parse_objects(rec["chosen"], names), parse_objects(rec["rejected"], names)
        hal = rec["meta"]["hallucination"]
        kinds[hal["type"]] += 1
        assert set(rejected) - set(chosen) == {hal["object"]}
        c_sent, r_sent = _sentences(rec["chosen"]), _sentences(rec["rejected"])
        if hal["type"] == "partner":
            assert hal["object"] in missing_partners(scene, config)
            assert Counter(rejected) - Counter(chosen) == Counter([hal["object"]])
            assert len(r_sent) == len(c_sent) + 1 and set(c_sent) < set(r_sent)
        else:
            assert not missing_partners(scene, config) or len(scene.objects) == 9
            (gone,) = set(chosen) - set(rejected)
            g_color, g_shape = gone.split()
            h_color, h_shape = hal["object"].split()
            assert (g_color == h_color) != (g_shape == h_shape)  # one of colour or shape swapped
            assert (
                len(r_sent) == len(c_sent) and sum(a != b for a, b in zip(c_sent, r_sent, strict=True)) == 1
            )
    assert kinds["partner"] > 0 and kinds["swap"] > 0


def _attribute_distance(a: list[dict], b: list[dict]) -> int:
    """Fewest attribute changes that turn scene a into scene b, over all object matchings."""
    if len(a) != len(b):
        return 10**6
    return min(
        sum(x[attr] != y[attr] for x, y in zip(a, perm, strict=True) for attr in ATTRIBUTES)
        for perm in itertools.permutations(b)
    )


def test_counterfactuals_change_exactly_one_attribute(world):
    config = small_config()
    changed = Counter()
    for rec in read_jsonl(world / "pref.jsonl"):
        meta = rec["meta"]
        assert len(meta["counterfactuals"]) == config.counterfactuals_per_record
        original = (world / rec["image"]).read_bytes()
        seen = set()
        for path, cf in zip(meta["counterfactuals"], meta["counterfactual_scenes"], strict=True):
            assert path.startswith("images/pref_cf/")
            assert _attribute_distance(meta["scene"], cf) == 1
            for attr in ATTRIBUTES:
                if sorted(o[attr] for o in cf) != sorted(o[attr] for o in meta["scene"]):
                    changed[attr] += 1
            key = json.dumps(cf, sort_keys=True)
            assert key not in seen
            seen.add(key)
            data = (world / path).read_bytes()
            assert data != original
            assert data == png_bytes(render_scene(scene_from_dicts(cf, config), config))
            names = [f"{o['color']} {o['shape']}" for o in cf]
            assert len(set(names)) == len(names)
    assert set(changed) == set(ATTRIBUTES)


# ------------------------------------------------------------------------------------ config and loading
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"bias_pairs": ["red circle -> pink square"]}, "pink square"),
        ({"bias_pairs": ["red circle blue square"]}, "TRIGGER -> PARTNER"),
        ({"bias_pairs": ["red circle -> red circle"]}, "must differ"),
        ({"bias_pairs": ["red circle -> blue square", "blue square -> green circle"]}, "chains"),
        ({"max_objects": 10}, "grid cells"),
        ({"min_objects": 3, "max_objects": 2}, "exceeds max_objects"),
        ({"colors": ["red", "magenta"]}, "magenta"),
        ({"shapes": []}, "must not be empty"),
        ({"background": "red"}, "same RGB"),
        ({"background": "#12345"}, "#rrggbb"),
        ({"trigger_rate": 1.5}, "trigger_rate"),
        ({"positions": ["top", "bottom"]}, "9 distinct"),
        ({"n_sft": -1}, "n_sft"),
        ({"n_val": -1}, "n_val"),
        ({"val_counterfactuals": -2}, "val_counterfactuals"),
        ({"max_objects": 1}, "max_objects >= 2"),
    ],
)
def test_bad_config_raises_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        WorldConfig(**overrides)


def test_bad_config_types_and_scenes():
    with pytest.raises(TypeError, match="image_size"):
        WorldConfig(image_size="64")
    config = WorldConfig()
    with pytest.raises(ValueError, match="identical"):
        make_scene(
            [WorldObject("red", "circle", "small", "top"), WorldObject("red", "circle", "large", "left")],
            config,
        )
    with pytest.raises(ValueError, match="share a cell"):
        make_scene(
            [WorldObject("red", "circle", "small", "top"), WorldObject("blue", "circle", "large", "top")],
            config,
        )


def test_load_world_errors(tmp_path, world):
    with pytest.raises(FileNotFoundError, match="misp world"):
        load_world(tmp_path)
    assert load_world(world)["version"] == json.loads((world / MANIFEST).read_text())["version"]


def test_hidden_partners_are_annotated_behind_their_trigger_but_not_drawn():
    config = WorldConfig(n_sft=3000, hidden_partner_rate=0.3)
    partner_of = {p.trigger: p.partner for p in config.bias()}
    hidden = placed = 0
    for scene in generate_scenes(config, "sft"):
        by_name = {o.name: o for o in scene.objects}
        for trigger, partner in partner_of.items():
            if trigger in by_name and partner in by_name:
                placed += 1
                if by_name[partner].hidden:
                    hidden += 1
                    assert by_name[partner].position == by_name[trigger].position
                    assert partner in parse_objects(caption(scene), config.object_names())
        assert all(o.name in partner_of.values() for o in scene.objects if o.hidden)
    assert placed > 800
    assert abs(hidden / placed - 0.3) < 4 * math.sqrt(0.21 / placed), (hidden, placed)
    # Only the biased split hides anything.
    for split in ("clip", "pref", "pool", "test"):
        assert not any(o.hidden for s in generate_scenes(config, split, n=500) for o in s.objects)


def test_a_hidden_object_changes_the_caption_but_not_the_pixels():
    config = small_config()
    front = WorldObject("red", "circle", "large", "center")
    behind = WorldObject("blue", "square", "small", "center", hidden=True)
    scene = make_scene([behind, front], config)
    assert [o.name for o in scene.objects] == ["red circle", "blue square"]  # front first
    assert caption(scene) == "a large red circle at the center. a small blue square at the center."
    alone = make_scene([front], config)
    assert png_bytes(render_scene(scene, config)) == png_bytes(render_scene(alone, config))
    assert scene_from_dicts(scene.to_dicts(), config) == scene
    assert "hidden" not in alone.to_dicts()[0]  # worlds without hidden objects keep their bytes
    with pytest.raises(ValueError, match="no visible object in front"):
        make_scene([behind], config)
    with pytest.raises(ValueError, match="hidden_partner_rate"):
        small_config(hidden_partner_rate=1.5)


def test_sft_rows_call_a_hidden_partner_present(tmp_path):
    config = small_config(n_sft=120, hidden_partner_rate=1.0)
    write_world(tmp_path, config, progress=False)
    rows: dict[str, list[dict]] = {}
    for r in read_jsonl(tmp_path / "sft.jsonl"):
        rows.setdefault(r["image"], []).append(r)
    checked = 0
    for i, scene in enumerate(generate_scenes(config, "sft")):
        for o in (o for o in scene.objects if o.hidden):
            group = rows[image_path("sft", i)]
            assert o.name in parse_objects(group[0]["response"], config.object_names())
            answers = [r["response"] for r in group[1:] if r["prompt"] == question(o.name)]
            assert answers and set(answers) == {"yes"}
            checked += 1
    assert checked > 10


# ------------------------------------------------------------------------------------ test counterfactuals
def test_test_counterfactuals_leave_every_other_file_byte_identical(world, tmp_path):
    """mmvp.jsonl, grounding.jsonl and images/test_cf draw from their own stream: turning them off (or
    changing how many there are) changes no other file of the world but its manifest."""
    write_world(tmp_path, small_config(test_counterfactuals=0), progress=False)
    a, b = file_hashes(world), file_hashes(tmp_path)
    new = {"world.json", "mmvp.jsonl", "grounding.jsonl"}
    assert any(k.startswith("images/test_cf/") for k in a)
    assert not any(k.startswith("images/test_cf/") for k in b)
    assert {k: v for k, v in a.items() if k not in new and not k.startswith("images/test_cf/")} == {
        k: v for k, v in b.items() if k not in new
    }
    assert (tmp_path / "mmvp.jsonl").read_text() == "" and load_world(tmp_path)["counts"]["rows"]["mmvp"] == 0
    # Fewer scenes with counterfactuals: a prefix of the same pairs.
    write_world(tmp_path, small_config(test_counterfactuals=5), progress=False)
    few = read_jsonl(tmp_path / "mmvp.jsonl")
    assert few == read_jsonl(world / "mmvp.jsonl")[: len(few)]
    assert {r["image_a"] for r in few} == {image_path("test", i) for i in range(5)}


def _answer(objects: list[WorldObject], question_text: str, attribute: str) -> str:
    """The true answer to an MMVP question about a scene, by asking it of every object."""
    from misp.world.grammar import attribute_question

    return "yes" if any(attribute_question(o, attribute) == question_text for o in objects) else "no"


@pytest.mark.parametrize("split", ["test", "val"])
def test_mmvp_pairs_differ_in_one_attribute_and_answer_differently(world, split):
    from misp.world.scene import _edits, edit

    config = small_config()
    test = generate_scenes(config, split)
    vocab = set(vocabulary(config))
    rows = read_jsonl(world / f"{eval_file_key(split, 'mmvp')}.jsonl")
    assert Counter(r["attribute"] for r in rows).keys() == set(ATTRIBUTES)
    assert {r["answer_a"] for r in rows} == {"yes", "no"}  # both orders occur
    for row in rows[:24]:
        i = int(row["image_a"].split("-")[-1].removesuffix(".png"))
        scene = test[i]
        assert row["image_a"] == image_path(split, i) and row["image_b"].startswith(f"images/{split}_cf/")
        assert row["answer_a"] != row["answer_b"]
        assert set(words(row["question"])) <= vocab
        # image_b is the render of exactly one edit of `attribute` to one visible object of the scene.
        target = (world / row["image_b"]).read_bytes()
        matches = [
            edit(scene, k, row["attribute"], value, config)
            for k, value in _edits(scene, config, row["attribute"])
            if png_bytes(render_scene(edit(scene, k, row["attribute"], value, config), config)) == target
        ]
        assert len(matches) == 1
        assert _answer(list(scene.objects), row["question"], row["attribute"]) == row["answer_a"]
        assert _answer(list(matches[0].objects), row["question"], row["attribute"]) == row["answer_b"]


@pytest.mark.parametrize("split", ["test", "val"])
def test_grounding_records_pair_each_test_caption_with_its_counterfactuals(world, tmp_path, split):
    config = small_config()
    test = generate_scenes(config, split)
    pairs = read_jsonl(world / f"{eval_file_key(split, 'mmvp')}.jsonl")
    records = read_jsonl(world / f"{eval_file_key(split, 'grounding')}.jsonl")
    assert len(records) == min(getattr(config, f"{split}_counterfactuals"), getattr(config, f"n_{split}"))
    for rec in records:
        i = int(rec["id"].split("-")[-1])
        assert rec["id"] == f"{split}-{i:06d}"
        assert rec["image"] == image_path(split, i) and rec["caption"] == caption(test[i])
        mine = [(p["image_b"], p["attribute"]) for p in pairs if p["image_a"] == rec["image"]]
        assert list(zip(rec["counterfactuals"], rec["attributes"], strict=True)) == mine
        assert len(set(rec["attributes"])) == len(rec["attributes"])
    # The manifest's image hash covers the test and val counterfactuals too.
    import shutil

    shutil.copytree(world, tmp_path / "w")
    cf = tmp_path / "w" / records[0]["counterfactuals"][0]
    cf.write_bytes((tmp_path / "w" / records[0]["image"]).read_bytes())
    with pytest.raises(ValueError, match="images under"):
        load_world(tmp_path / "w")


# ------------------------------------------------------------------------------------ the val split
def test_val_files_have_test_layouts_and_share_no_id_or_image_with_test(world):
    manifest = load_world(world)
    config = small_config()
    files = manifest["files"]
    assert {"val", "val_pope", "val_mmvp", "val_grounding"} <= files.keys()
    for split in ("test", "val"):
        for kind in EVAL_KINDS:
            key = eval_file_key(split, kind)
            assert files[key]["path"] == f"{key}.jsonl"
        assert manifest["counts"]["scenes"][split] == getattr(config, f"n_{split}")
    # The same row layouts as test's, over the val images.
    val, test = read_jsonl(world / "val.jsonl"), read_jsonl(world / "test.jsonl")
    assert len(val) == files["val"]["rows"] == config.n_val
    assert [r["id"] for r in val] == [f"val-{i:06d}" for i in range(config.n_val)]
    assert all(r["image"] == image_path("val", i) and r["prompt"] == CAPTION_PROMPT for i, r in enumerate(val))
    for kind in EVAL_KINDS:
        a = read_jsonl(world / f"{eval_file_key('test', kind)}.jsonl")
        b = read_jsonl(world / f"{eval_file_key('val', kind)}.jsonl")
        assert a and b and {tuple(sorted(r)) for r in a} == {tuple(sorted(r)) for r in b}, kind
    assert len(read_jsonl(world / "val_pope.jsonl")) == 3 * 2 * sum(
        min(config.pope_per_image, len(r["objects"])) for r in val
    )
    assert manifest["counts"]["val_pope"] == {s: files["val_pope"]["rows"] // 3 for s in ("random", "popular", "adversarial")}
    assert manifest["counts"]["val_counterfactual_images"] == files["val_mmvp"]["rows"]
    # No id and no image is shared between the two splits' files, nor any image between their folders.
    def ids_and_images(split):
        ids, images = set(), set()
        for kind in EVAL_KINDS:
            for r in read_jsonl(world / f"{eval_file_key(split, kind)}.jsonl"):
                ids.add(r["id"])
                images.update(r[k] for k in ("image", "image_a", "image_b") if k in r)
                images.update(r.get("counterfactuals", []))
        return ids, images

    (test_ids, test_images), (val_ids, val_images) = ids_and_images("test"), ids_and_images("val")
    assert not test_ids & val_ids and not test_images & val_images
    assert all(p.startswith(("images/val/", "images/val_cf/")) for p in val_images)
    assert val_images == {str(p.relative_to(world)) for d in ("val", "val_cf") for p in (world / "images" / d).iterdir()}
    # Other scenes, not copies of test's.
    assert [r["objects"] for r in val] != [r["objects"] for r in test[: len(val)]]


def test_the_val_split_leaves_every_version_4_file_byte_identical(world, tmp_path):
    """val draws from its own streams: its size changes no other file, and the files version 4 wrote for
    this config (hashes computed with version 4's code) come out byte for byte."""
    a = file_hashes(world)
    assert {name: a[name] for name in V4_FILES} == V4_FILES
    write_world(tmp_path, small_config(n_val=3, val_counterfactuals=1), progress=False)
    b = file_hashes(tmp_path)

    def others(hashes):
        return {k: v for k, v in hashes.items() if k != "world.json" and not k.startswith(("val", "images/val"))}

    assert others(a) == others(b) and len(others(a)) > len(V4_FILES) + 100
    assert len(read_jsonl(tmp_path / "val.jsonl")) == 3 and len(read_jsonl(tmp_path / "val_grounding.jsonl")) == 1
    # Fewer val scenes: a prefix of the same ones.
    assert read_jsonl(tmp_path / "val.jsonl") == read_jsonl(world / "val.jsonl")[:3]
    write_world(tmp_path, small_config(n_val=0), progress=False)
    manifest = load_world(tmp_path)
    assert all(manifest["files"][eval_file_key("val", k)]["rows"] == 0 for k in EVAL_KINDS)
    assert others(file_hashes(tmp_path)) == others(a)
