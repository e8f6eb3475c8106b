"""Writing a Shapes world to disk (the files real datasets use) and reading its manifest back.

Layout under ``out_dir`` (image paths in the JSONL files are relative to ``out_dir``)::

    world.json    manifest: config, vocabulary, objects, bias pairs, file hashes, counts, statistics
    clip.jsonl    {"id", "image", "caption"}
    sft.jsonl     {"id", "image", "prompt", "response"}: a caption example and yes/no questions per scene
    pref.jsonl    {"id", "image", "prompt", "chosen", "rejected", "meta"}: preference records
    pool.jsonl    {"id", "image", "objects"}: distractor images for negative retrieval
    test.jsonl    {"id", "image", "prompt", "objects"}: captioning prompts with ground-truth objects
    pope.jsonl    {"id", "image", "question", "label", "split", "object"}: POPE over the test images
    mmvp.jsonl    {"id", "image_a", "image_b", "question", "answer_a", "answer_b", "attribute", "object"}:
                  Shapes-MMVP, a test image and its one-attribute counterfactual with a question whose
                  answer differs between the two
    grounding.jsonl  {"id", "image", "prompt", "caption", "counterfactuals", "attributes"}: test captions
                  with one counterfactual render per attribute (likelihood grounding)
    edits.jsonl   (format 6, ``partner_scenes`` > 0) {"id", "image", "prompt", "caption", "objects",
                  "counterfactuals": [{"image", "caption", "edit", "partner", "span"}]}: extra test scenes
                  that hold a trigger with its partner, each with its partner-removed counterfactual (and
                  ``object_edits`` more object removals or insertions), every image captioned
    val.jsonl, val_pope.jsonl, val_mmvp.jsonl, val_grounding.jsonl
                  the same four evaluation files over the val split (same distribution as test, own
                  random streams, ids prefixed val-, val_pope-, val_mmvp-): for validation during fit
                  and choosing hyperparameters, so that test is only reported
    images/{clip,sft,pref,pref_cf,pool,test,test_cf,val,val_cf}/*.png
    images/{test_edits,val_edits}/*.png   (format 6: edits.jsonl's and val_edits.jsonl's images)

Format 6 adds, only where ``object_edits`` or ``partner_scenes`` is above 0, the object edits of the pref
records (``meta["captioned_counterfactuals"]``, their images under images/pref_cf/) and the edits files
of the evaluation splits; with both at 0 every file, world.json included, is version 5's byte for byte.

Every file is written atomically and ``world.json`` last: it is the world's commit mark. Regenerating
over an existing world removes the old mark before writing anything, so a run interrupted half-way leaves
a folder ``load_world`` refuses (no manifest), never a mix of old and new images that passes for a world.
The manifest also holds the SHA-256 of every JSON Lines file and one hash over every image, which
``load_world`` checks, so files changed or mixed in later are noticed too.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from misp.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, sha256_file
from misp.world import grammar
from misp.world.config import EVAL_SPLITS, EXTENSION_FIELDS, SPLITS, WorldConfig
from misp.world.render import png_bytes, render_scene
from misp.world.scene import (
    ATTRIBUTES,
    Scene,
    attribute_counterfactual,
    counterfactuals,
    generate_scenes,
    hallucinate,
    missing_partners,
    object_edits,
    sample_pair_scene,
    split_rng,
)

WORLD_VERSION = 5
"""Format version of world.json and the files it lists (3: the manifest hashes the images; 4: adds
mmvp.jsonl and grounding.jsonl over test counterfactuals; every other file is byte-identical to 3's;
5: adds the val split's val.jsonl, val_pope.jsonl, val_mmvp.jsonl and val_grounding.jsonl; every other
file and image is byte-identical to 4's)."""

EDITS_VERSION = 6
"""Format version of a world with object edits or partner scenes (``WorldConfig.extended``): version 5's
files plus pref records' ``meta["captioned_counterfactuals"]`` and the edits files of the evaluation splits."""

READABLE_VERSIONS: tuple[int, ...] = (WORLD_VERSION, EDITS_VERSION)
"""World format versions this misp reads."""

MANIFEST = "world.json"
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
TOP_PARTNERS = 3
"""Co-occurring objects listed per object in the manifest."""


def record_id(split: str, i: int) -> str:
    return f"{split}-{i:06d}"


def image_path(split: str, i: int) -> str:
    """Path of a scene's image relative to the world folder."""
    return f"images/{split}/{record_id(split, i)}.png"


def counterfactual_path(i: int, j: int) -> str:
    return f"images/pref_cf/{record_id('pref', i)}-cf{j}.png"


EVAL_KINDS: tuple[str, ...] = ("captions", "pope", "mmvp", "grounding")
"""The evaluation files every split of ``EVAL_SPLITS`` has."""

EDITS_KIND = "edits"
"""The evaluation file of format 6's partner scenes (``WorldConfig.partner_scenes``): edits.jsonl, val_edits.jsonl."""


def eval_file_key(split: str, kind: str) -> str:
    """Manifest ``files`` key (and file stem) of one evaluation file of ``split``.

    test's files keep the names version 4 gave them (test, pope, mmvp, grounding); every other split's
    are prefixed with the split (val, val_pope, val_mmvp, val_grounding). The key also prefixes the file's
    row ids, so no two evaluation files share an id.
    """
    if split not in EVAL_SPLITS:
        raise ValueError(f"split {split!r} has no evaluation files; those that do: {EVAL_SPLITS}")
    if kind not in (*EVAL_KINDS, EDITS_KIND):
        raise ValueError(f"unknown evaluation file kind {kind!r}; known: {(*EVAL_KINDS, EDITS_KIND)}")
    if kind == "captions":
        return split
    return kind if split == "test" else f"{split}_{kind}"


def eval_counterfactual_path(split: str, i: int, attribute: str) -> str:
    """Path of evaluation scene ``i``'s counterfactual that changes ``attribute`` (``split``: test or val)."""
    return f"images/{split}_cf/{record_id(split, i)}-{attribute}.png"


# ---------------------------------------------------------------------------------------- statistics
def object_frequency(scenes: list[Scene]) -> Counter:
    """Number of scenes containing each object."""
    return Counter(name for s in scenes for name in s.names)


def cooccurrence(scenes: list[Scene]) -> dict[str, Counter]:
    """``cooc[a][b]``: number of scenes that contain both a and b (a != b)."""
    cooc: dict[str, Counter] = {}
    for s in scenes:
        for a in s.names:
            row = cooc.setdefault(a, Counter())
            row.update(b for b in s.names if b != a)
    return cooc


def bias_statistics(scenes: list[Scene], config: WorldConfig) -> dict:
    """Per bias pair: trigger scenes, P(partner | trigger), P(partner | no trigger), P(partner), and the
    share of partners present with their trigger that are hidden behind it."""
    out: dict[str, dict] = {}
    for pair in config.bias():
        with_t = [pair.partner in s.names for s in scenes if pair.trigger in s.names]
        without_t = [pair.partner in s.names for s in scenes if pair.trigger not in s.names]
        hidden = [
            any(o.hidden for o in s.objects if o.name == pair.partner)
            for s in scenes
            if pair.trigger in s.names and pair.partner in s.names
        ]
        out[f"{pair.trigger} -> {pair.partner}"] = {
            "trigger_scenes": len(with_t),
            "partner_given_trigger": _rate(with_t),
            "partner_given_no_trigger": _rate(without_t),
            "partner_rate": _rate(with_t + without_t),
            "hidden_given_both": _rate(hidden),
        }
    return out


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _split_statistics(scenes: list[Scene], config: WorldConfig) -> dict:
    n_objects = [len(s.objects) for s in scenes]
    return {
        "scenes": len(scenes),
        "mean_objects": sum(n_objects) / len(n_objects) if n_objects else None,
        "bias": bias_statistics(scenes, config),
    }


def _top_partners(scenes: list[Scene], config: WorldConfig) -> dict[str, list[dict]]:
    freq = object_frequency(scenes)
    cooc = cooccurrence(scenes)
    order = {n: i for i, n in enumerate(config.object_names())}
    out = {}
    for name in config.object_names():
        row = cooc.get(name, Counter())
        top = sorted(row, key=lambda b: (-row[b], order[b]))[:TOP_PARTNERS]
        out[name] = [{"object": b, "count": row[b], "rate": row[b] / freq[name]} for b in top]
    return out


# ---------------------------------------------------------------------------------------- rows
def _sft_questions(scene: Scene, rng: random.Random, config: WorldConfig) -> list[tuple[str, str]]:
    """Balanced (question, answer) pairs: as many 'yes' as 'no', plus a coin-flip one when odd."""
    q = config.sft_questions_per_image
    present = scene.names
    absent = [n for n in config.object_names() if n not in present]
    n_pairs = min(q // 2, len(present), len(absent))
    yes = rng.sample(present, n_pairs)
    no = rng.sample(absent, n_pairs)
    if q % 2:
        left_yes = [n for n in present if n not in yes]
        left_no = [n for n in absent if n not in no]
        if left_yes and (not left_no or rng.random() < 0.5):
            yes.append(rng.choice(left_yes))
        elif left_no:
            no.append(rng.choice(left_no))
    pairs = [(n, grammar.YES) for n in yes] + [(n, grammar.NO) for n in no]
    rng.shuffle(pairs)
    return [(grammar.question(n), a) for n, a in pairs]


def _partner_questions(scene: Scene, config: WorldConfig) -> list[tuple[str, str]]:
    """The question about each present trigger's partner, answered truthfully (see partner_questions)."""
    names = scene.names
    return [
        (grammar.question(pair.partner), grammar.YES if pair.partner in names else grammar.NO)
        for pair in config.bias()
        if pair.trigger in names
    ]


def _sft_rows(scenes: list[Scene], config: WorldConfig) -> list[dict]:
    rng = split_rng(config.seed, "questions/sft")
    rows = []
    for i, scene in enumerate(scenes):
        img = image_path("sft", i)
        examples = [(grammar.CAPTION_PROMPT, grammar.caption(scene))]
        examples += _sft_questions(scene, rng, config)
        if config.partner_questions:
            examples += _partner_questions(scene, config)
        for prompt, response in examples:
            rows.append(
                {"id": record_id("sft", len(rows)), "image": img, "prompt": prompt, "response": response}
            )
    return rows


def _pref_rows(scenes: list[Scene], config: WorldConfig) -> tuple[list[dict], list[tuple[str, Scene]]]:
    """Preference records and the counterfactual renders they reference."""
    from misp.world.describe import scene_difference  # describe reads written worlds through this module

    hal_rng = split_rng(config.seed, "hallucination/pref")
    cf_rng = split_rng(config.seed, "counterfactual/pref")
    # Its own stream, so the files of a world without object edits keep their bytes.
    edit_rng = split_rng(config.seed, "object_edits/pref")
    rows, renders = [], []
    for i, scene in enumerate(scenes):
        rejected, kind, hallucinated = hallucinate(scene, hal_rng, config)
        cfs = counterfactuals(scene, cf_rng, config, config.counterfactuals_per_record)
        cf_paths = [counterfactual_path(i, j) for j in range(len(cfs))]
        renders += zip(cf_paths, cfs, strict=True)
        meta = {
            "objects": scene.names,
            "scene": scene.to_dicts(),
            "hallucination": {"type": kind, "object": hallucinated},
            "counterfactuals": cf_paths,
            "counterfactual_scenes": [cf.to_dicts() for cf in cfs],
        }
        if config.object_edits:
            captioned = [
                {"image": p, "caption": grammar.caption(cf), "edit": " ".join(scene_difference(scene, cf)), "partner": False}
                for p, cf in zip(cf_paths, cfs, strict=True)
            ]
            edits = object_edits(scene, edit_rng, config, config.object_edits)
            paths = [f"images/pref_cf/{record_id('pref', i)}-edit{j}.png" for j in range(len(edits))]
            renders += [(p, e.scene) for p, e in zip(paths, edits, strict=True)]
            captioned += [_captioned_edit(scene, e, p) for p, e in zip(paths, edits, strict=True)]
            meta["captioned_counterfactuals"] = captioned
        rows.append(
            {
                "id": record_id("pref", i),
                "image": image_path("pref", i),
                "prompt": grammar.CAPTION_PROMPT,
                "chosen": grammar.caption(scene),
                "rejected": grammar.caption(rejected),
                "meta": meta,
            }
        )
    return rows, renders


def _captioned_edit(scene: Scene, e, path: str) -> dict:
    """One object edit as records hold it: its image, its true caption, the edit, whether it is the bias
    pair's partner, and the ``[start, end)`` character span of the edited object's sentence in the caption
    that names it (the scene's for a removal, the edited scene's for an insertion)."""
    named = scene if e.kind == "remove" else e.scene
    return {
        "image": path,
        "caption": grammar.caption(e.scene),
        "edit": e.label,
        "partner": e.partner,
        "span": list(grammar.sentence_span(named, e.object.name)),
    }


def present_partner_cases(scenes: list[Scene], config: WorldConfig) -> int:
    """(scene, bias pair) cases with both the trigger and the partner in the scene: partner_present_rate's
    denominator over these scenes."""
    pairs = config.bias()
    return sum(p.trigger in s.names and p.partner in s.names for s in scenes for p in pairs)


def partner_scenes(config: WorldConfig, split: str) -> list[Scene]:
    """The ``partner_scenes`` scenes of evaluation split ``split``, bias pairs in turn, from their own stream."""
    rng = split_rng(config.seed, f"partner_scenes/{split}")
    pairs = config.bias()
    return [sample_pair_scene(rng, config, pairs[i % len(pairs)]) for i in range(config.partner_scenes)]


def _edit_rows(scenes: list[Scene], config: WorldConfig, split: str) -> tuple[list[dict], list[tuple[str, Scene]]]:
    """The edits file of evaluation split ``split`` over its partner scenes, and the renders it names."""
    rng = split_rng(config.seed, f"object_edits/{split}")
    key = eval_file_key(split, EDITS_KIND)
    rows, renders = [], []
    for i, scene in enumerate(scenes):
        rid = record_id(key, i)
        image = f"images/{split}_edits/{rid}.png"
        renders.append((image, scene))
        # A partner scene's partner is visible and it holds two objects, so its removal comes first.
        edits = object_edits(scene, rng, config, 1 + config.object_edits)
        paths = [f"images/{split}_edits/{rid}-e{j}.png" for j in range(len(edits))]
        renders += [(p, e.scene) for p, e in zip(paths, edits, strict=True)]
        rows.append(
            {
                "id": rid,
                "image": image,
                "prompt": grammar.CAPTION_PROMPT,
                "caption": grammar.caption(scene),
                "objects": scene.names,
                "counterfactuals": [_captioned_edit(scene, e, p) for p, e in zip(paths, edits, strict=True)],
            }
        )
    return rows, renders


def pope_negatives(
    scene: Scene,
    k: int,
    split: str,
    rng: random.Random,
    config: WorldConfig,
    freq: Counter,
    cooc: dict[str, Counter],
) -> list[str]:
    """``k`` absent objects to ask about, chosen as POPE's ``split`` prescribes (Li et al. 2023).

    random: uniform over absent objects; popular: the most frequent objects of the sft split;
    adversarial: the partners a present trigger is missing, then the objects that co-occur most with the
    scene's objects in the sft split. Ties go to config order, so the choice is deterministic.
    """
    order = {n: i for i, n in enumerate(config.object_names())}
    present = scene.names
    absent = [n for n in config.object_names() if n not in present]
    k = min(k, len(absent))
    if split == "random":
        return rng.sample(absent, k)
    if split == "popular":
        return sorted(absent, key=lambda n: (-freq[n], order[n]))[:k]
    if split == "adversarial":
        first = missing_partners(scene, config)
        score = {n: sum(cooc.get(p, Counter())[n] for p in present) for n in absent}
        rest = sorted((n for n in absent if n not in first), key=lambda n: (-score[n], -freq[n], order[n]))
        return (first + rest)[:k]
    raise ValueError(f"unknown POPE split {split!r}; known: {POPE_SPLITS}")


def _eval_stream(kind: str, split: str) -> str:
    # test keeps the stream names of version 4 (so its files stay byte-identical); other splits get their own.
    return kind if split == "test" else f"{kind}/{split}"


def _caption_rows(scenes: list[Scene], split: str) -> list[dict]:
    """Captioning prompts with the ground-truth objects of each scene of an evaluation split (CHAIR)."""
    return [
        {"id": record_id(split, i), "image": image_path(split, i), "prompt": grammar.CAPTION_PROMPT, "objects": s.names}
        for i, s in enumerate(scenes)
    ]


def _pope_rows(scenes: list[Scene], sft: list[Scene], config: WorldConfig, split: str) -> list[dict]:
    """POPE questions over the images of evaluation split ``split``; negatives follow the sft split's
    frequencies and co-occurrences (the prior the model learnt), whatever split is asked about."""
    rng = split_rng(config.seed, _eval_stream("pope", split))
    key = eval_file_key(split, "pope")
    freq, cooc = object_frequency(sft), cooccurrence(sft)
    positives = [rng.sample(s.names, min(config.pope_per_image, len(s.names))) for s in scenes]
    rows = []
    for pope_split in POPE_SPLITS:
        for i, (scene, yes) in enumerate(zip(scenes, positives, strict=True)):
            no = pope_negatives(scene, len(yes), pope_split, rng, config, freq, cooc)
            qs = [(n, grammar.YES) for n in yes] + [(n, grammar.NO) for n in no]
            rng.shuffle(qs)
            for name, label in qs:
                rows.append(
                    {
                        "id": record_id(key, len(rows)),
                        "image": image_path(split, i),
                        "question": grammar.question(name),
                        "label": label,
                        "split": pope_split,
                        "object": name,
                    }
                )
    return rows


def _eval_counterfactual_rows(
    scenes: list[Scene], config: WorldConfig, split: str
) -> tuple[list[dict], list[dict], list[tuple[str, Scene]]]:
    """Shapes-MMVP pairs, likelihood-grounding records and the counterfactual renders they reference, over
    the scenes of evaluation split ``split`` (test or val).

    The first ``config.{split}_counterfactuals`` scenes each get one counterfactual per attribute that
    admits a visible change. Each (scene, counterfactual) is one MMVP pair whose question is about the
    edited object: a coin decides whether it names the original value (answers yes/no) or the new one
    (no/yes), so neither "always yes" nor "always no" passes a pair. Everything draws from the split's own
    stream ("counterfactual/test", "counterfactual/val"), so no other file of the world depends on these.
    """
    rng = split_rng(config.seed, f"counterfactual/{split}")
    mmvp_key = eval_file_key(split, "mmvp")
    mmvp, grounding, renders = [], [], []
    for i, scene in enumerate(scenes[: getattr(config, f"{split}_counterfactuals")]):
        paths, attributes = [], []
        for attribute in ATTRIBUTES:
            drawn = attribute_counterfactual(scene, attribute, rng, config)
            if drawn is None:
                continue
            index, value, cf = drawn
            path = eval_counterfactual_path(split, i, attribute)
            renders.append((path, cf))
            paths.append(path)
            attributes.append(attribute)
            before = scene.objects[index]
            after = replace(before, **{attribute: value})
            asked = before if rng.random() < 0.5 else after
            mmvp.append(
                {
                    "id": record_id(mmvp_key, len(mmvp)),
                    "image_a": image_path(split, i),
                    "image_b": path,
                    "question": grammar.attribute_question(asked, attribute),
                    "answer_a": grammar.answer(asked is before),
                    "answer_b": grammar.answer(asked is after),
                    "attribute": attribute,
                    "object": before.name,
                }
            )
        if paths:
            grounding.append(
                {
                    "id": record_id(split, i),
                    "image": image_path(split, i),
                    "prompt": grammar.CAPTION_PROMPT,
                    "caption": grammar.caption(scene),
                    "counterfactuals": paths,
                    "attributes": attributes,
                }
            )
    return mmvp, grounding, renders


# ---------------------------------------------------------------------------------------- writing
def write_world(out_dir: str | os.PathLike, config: WorldConfig | None = None, progress: bool = True) -> dict:
    """Generate the Shapes world described by ``config`` into ``out_dir``; return the manifest.

    Deterministic: the same config gives byte-identical files. Existing files of the same names are
    replaced; the manifest is written last.
    """
    config = WorldConfig() if config is None else config
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Withdraw the old commit mark first: from here until the new manifest lands, the folder is no world.
    (out / MANIFEST).unlink(missing_ok=True)

    scenes = {split: generate_scenes(config, split) for split in SPLITS}
    rows = {
        "clip": [
            {"id": record_id("clip", i), "image": image_path("clip", i), "caption": grammar.caption(s)}
            for i, s in enumerate(scenes["clip"])
        ],
        "sft": _sft_rows(scenes["sft"], config),
        "pool": [
            {"id": record_id("pool", i), "image": image_path("pool", i), "objects": s.names}
            for i, s in enumerate(scenes["pool"])
        ],
    }
    rows["pref"], cf_renders = _pref_rows(scenes["pref"], config)
    eval_cf_renders: dict[str, list[tuple[str, Scene]]] = {}
    for split in EVAL_SPLITS:
        key = partial(eval_file_key, split)
        rows[key("captions")] = _caption_rows(scenes[split], split)
        rows[key("pope")] = _pope_rows(scenes[split], scenes["sft"], config, split)
        rows[key("mmvp")], rows[key("grounding")], eval_cf_renders[split] = _eval_counterfactual_rows(
            scenes[split], config, split
        )

    edit_renders: list[tuple[str, Scene]] = []
    pair_scenes = {split: partner_scenes(config, split) for split in EVAL_SPLITS}
    if config.partner_scenes:
        for split in EVAL_SPLITS:
            rows[eval_file_key(split, EDITS_KIND)], more = _edit_rows(pair_scenes[split], config, split)
            edit_renders += more

    renders = [(image_path(split, i), s) for split in SPLITS for i, s in enumerate(scenes[split])]
    renders += cf_renders + [r for split in EVAL_SPLITS for r in eval_cf_renders[split]] + edit_renders
    image_hashes = {}
    for rel, scene in tqdm(renders, desc="rendering Shapes world", unit="img", disable=not progress):
        data = png_bytes(render_scene(scene, config))
        atomic_write_bytes(out / rel, data)
        image_hashes[rel] = hashlib.sha256(data).hexdigest()

    files = {}
    names = ["clip", "sft", "pref", "pool"] + [eval_file_key(s, k) for s in EVAL_SPLITS for k in EVAL_KINDS]
    names += [eval_file_key(s, EDITS_KIND) for s in EVAL_SPLITS if config.partner_scenes]
    for name in names:
        path = out / f"{name}.jsonl"
        atomic_write_jsonl(path, rows[name])
        files[name] = {"path": path.name, "rows": len(rows[name]), "sha256": sha256_file(path)}

    hallucinations = Counter(r["meta"]["hallucination"]["type"] for r in rows["pref"])
    extended = config.extended()
    recorded = asdict(config)
    if not extended:  # version 5's manifest did not know these fields
        for name in EXTENSION_FIELDS:
            del recorded[name]
    manifest = {
        "version": EDITS_VERSION if extended else WORLD_VERSION,
        "config": recorded,
        "vocabulary": grammar.vocabulary(config),
        "objects": grammar.object_names(config),
        "bias_pairs": [{"trigger": p.trigger, "partner": p.partner} for p in config.bias()],
        "prompt": grammar.CAPTION_PROMPT,
        "files": files,
        "images": {"count": len(image_hashes), "sha256": _images_hash(image_hashes)},
        "counts": {
            "scenes": {split: len(scenes[split]) for split in SPLITS},
            "rows": {name: f["rows"] for name, f in files.items()},
            "images": len(renders),
            "counterfactual_images": len(cf_renders),
            "test_counterfactual_images": len(eval_cf_renders["test"]),
            "val_counterfactual_images": len(eval_cf_renders["val"]),
            "mmvp": dict(Counter(r["attribute"] for r in rows["mmvp"])),
            "val_mmvp": dict(Counter(r["attribute"] for r in rows["val_mmvp"])),
            "hallucinations": {"partner": hallucinations["partner"], "swap": hallucinations["swap"]},
            "pope": dict(Counter(r["split"] for r in rows["pope"])),
            "val_pope": dict(Counter(r["split"] for r in rows["val_pope"])),
            **(_edit_counts(rows, scenes, pair_scenes, len(edit_renders), config) if extended else {}),
        },
        "statistics": {split: _split_statistics(scenes[split], config) for split in SPLITS},
        "cooccurrence": _top_partners(scenes["sft"], config),
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _edit_counts(
    rows: dict[str, list[dict]],
    scenes: dict[str, list[Scene]],
    pair_scenes: dict[str, list[Scene]],
    edit_images: int,
    config: WorldConfig,
) -> dict:
    """Format 6's generation summary: object-edit images, and per evaluation split the partner-present
    cases (partner_present_rate's denominator) in the split's own scenes and in its partner scenes, and
    the partner removals the log-prob probe compares."""
    pref_edits = [c for r in rows["pref"] for c in r["meta"].get("captioned_counterfactuals", []) if c.get("span")]
    out = {"pref_object_edits": len(pref_edits), "pref_partner_edits": sum(c["partner"] for c in pref_edits),
           "edits_images": edit_images, "partner_present": {}}
    for split in EVAL_SPLITS:
        edits = rows.get(eval_file_key(split, EDITS_KIND), [])
        own = present_partner_cases(scenes[split], config)
        extra = present_partner_cases(pair_scenes[split], config)
        out["partner_present"][split] = {
            "split_scenes": own,
            "partner_scenes": extra,
            "cases": own + extra,
            "partner_removals": sum(c["partner"] and c["edit"].startswith("-") for r in edits for c in r["counterfactuals"]),
        }
    return out


def _images_hash(hashes: dict[str, str]) -> str:
    """One hash over every image of a world: relative path and SHA-256 of its bytes, in path order."""
    h = hashlib.sha256()
    for rel in sorted(hashes):
        h.update(f"{rel}\0{hashes[rel]}\n".encode())
    return h.hexdigest()


def _referenced_images(root: Path, manifest: dict) -> set[str]:
    """Every image path the world's JSON Lines files name: rows' ``image`` (``image_a``/``image_b`` of
    MMVP pairs), preference counterfactuals and test and val counterfactuals."""
    rels: set[str] = set()
    for f in manifest["files"].values():
        with open(root / f["path"], encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                rels.update(row[k] for k in ("image", "image_a", "image_b") if k in row)
                meta = row.get("meta", {})
                rels.update(meta.get("counterfactuals", []))
                rels.update(c["image"] for c in meta.get("captioned_counterfactuals", []))
                # grounding rows list paths; edits rows list captioned counterfactuals.
                rels.update(c["image"] if isinstance(c, dict) else c for c in row.get("counterfactuals", []))
    return rels


def read_manifest(world: str | os.PathLike) -> dict:
    """The manifest of a world folder (or of the ``world.json`` given), checked for JSON and version only.

    Every reader of a world's metadata (the tiny tokenizer's vocabulary, CHAIR's objects, the evaluation's
    bias pairs, pair precision) goes through here, so a world from another misp version is refused by all
    of them, not only by the demo. ``load_world`` adds the check of every file's contents.

    Raises:
        FileNotFoundError: no ``world.json`` there (no world, or one whose regeneration was interrupted).
        ValueError: the manifest is not JSON, or has another format version.
    """
    path = Path(world)
    if path.is_dir() or not path.suffix:
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no Shapes world at {path.parent}: {path} is missing (create one with `misp world --out {path.parent}`; "
            "a world whose regeneration was interrupted has none either)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); regenerate the world") from None
    if not isinstance(manifest, dict) or manifest.get("version") not in READABLE_VERSIONS:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise ValueError(
            f"{path} has world format version {version!r}, this misp reads {' and '.join(map(str, READABLE_VERSIONS))}; regenerate the "
            f"world with `misp world --out {path.parent}`"
        )
    return manifest


def load_world(out_dir: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest (world.json) of a world written by ``write_world``, checked for completeness.

    Args:
        out_dir: the world's folder.
        verify: also check the contents: every JSON Lines file against its SHA-256 and every image
            against the manifest's image hash (reads the whole world: about a second for the default).

    Raises:
        FileNotFoundError: no manifest, or a file it lists is missing.
        ValueError: another format version, or a file whose contents differ from the manifest's.
    """
    manifest = read_manifest(out_dir)
    root = Path(out_dir)
    path = root / MANIFEST
    for name, f in manifest["files"].items():
        if not (root / f["path"]).is_file():
            raise FileNotFoundError(f"world file {name!r} ({f['path']}) listed in {path} is missing")
        if verify and sha256_file(root / f["path"]) != f["sha256"]:
            raise ValueError(f"world file {root / f['path']} differs from the one {path} lists; regenerate the world")
    if verify:
        hashes = {}
        for rel in _referenced_images(root, manifest):
            try:
                hashes[rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
            except FileNotFoundError:
                raise FileNotFoundError(f"world image {root / rel} named in {root} is missing") from None
        if _images_hash(hashes) != manifest.get("images", {}).get("sha256"):
            raise ValueError(
                f"the images under {root} differ from the ones {path} lists (a partial regeneration, or files "
                "copied in later); regenerate the world"
            )
    return manifest
