from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import pytest
from PIL import Image

from misp.data.records import (
    CaptionRecord,
    GroundingRecord,
    MMVPPair,
    PopeQuestion,
    PreferenceRecord,
    PromptRecord,
    RecordError,
    SFTRecord,
    read_caption_records,
    read_grounding_records,
    read_mmvp_pairs,
    read_pope_questions,
    read_preference_records,
    read_prompt_records,
    read_sft_records,
)
from misp.images import ImageReadError, load_rgb, verify_image


def _png(path: Path, color=(200, 30, 30), size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _pref(i: int, **over) -> dict:
    row = {
        "id": f"ex{i}",
        "image": "img/a.png",
        "prompt": "Describe.",
        "chosen": "A red box.",
        "rejected": "A cat.",
    }
    row.update(over)
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()


@pytest.fixture
def world(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", color=(0, 0, 255))
    return tmp_path


def _raises(fn, *, line, field, file: Path) -> RecordError:
    with pytest.raises(RecordError) as info:
        fn()
    err = info.value
    assert err.file == file
    assert err.line == line
    assert err.field == field
    prefix = f"{file}:{line}: " if line is not None else f"{file}: "
    assert str(err).startswith(prefix)
    if field is not None:
        assert f"field '{field}': " in str(err)
    return err


# --- valid files --------------------------------------------------------------------------------------


def test_reads_native_preference_records_with_resolved_paths(world: Path):
    f = _jsonl(
        world / "prefs.jsonl",
        [
            _pref(0, negatives=["img/b.png"], meta={"source": "t"}),
            "",  # blank lines are ignored
            _pref(1, image=str(world / "img" / "b.png")),
        ],
    )
    res = read_preference_records(f)
    assert len(res) == 2 and res.skipped == [] and res.path == f
    r0, r1 = res.records
    assert r0 == PreferenceRecord(
        id="ex0",
        image=world / "img" / "a.png",
        prompt="Describe.",
        chosen="A red box.",
        rejected="A cat.",
        negatives=(world / "img" / "b.png",),
        meta={"source": "t"},
    )
    assert r1.image == world / "img" / "b.png" and r1.negatives == () and r1.meta == {}
    assert r0.image.is_absolute()


def test_image_root_overrides_the_file_folder(world: Path, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    f = _jsonl(data / "p.jsonl", [_pref(0, image="a.png")])
    res = read_preference_records(f, image_root=world / "img")
    assert res.records[0].image == world / "img" / "a.png"
    # Without the root the same relative path is looked up next to the file, where it does not exist.
    _raises(lambda: read_preference_records(f), line=1, field="image", file=f)


def test_json_array_file_is_accepted(world: Path):
    f = world / "prefs.json"
    f.write_text(json.dumps([_pref(0), _pref(1)], indent=2))
    assert [r.id for r in read_preference_records(f)] == ["ex0", "ex1"]


def test_verify_images_false_skips_the_image_check(world: Path):
    f = _jsonl(world / "p.jsonl", [_pref(0, image="img/missing.png")])
    assert read_preference_records(f, verify_images=False).records[0].image == world / "img" / "missing.png"


def test_other_record_kinds(world: Path):
    f = _jsonl(
        world / "caps.jsonl",
        [{"image": "img/a.png", "caption": "a red box"}, {"id": 7, "image": "img/b.png", "caption": "x"}],
    )
    assert read_caption_records(f).records == [
        CaptionRecord(id="0", image=world / "img" / "a.png", caption="a red box"),
        CaptionRecord(id="7", image=world / "img" / "b.png", caption="x"),
    ]
    f = _jsonl(world / "sft.jsonl", [{"id": "s", "image": "img/a.png", "prompt": "p", "response": "r"}])
    assert read_sft_records(f).records == [
        SFTRecord(id="s", image=world / "img" / "a.png", prompt="p", response="r")
    ]
    f = _jsonl(
        world / "prompts.jsonl",
        [
            {"id": "q", "image": "img/a.png", "prompt": "p", "objects": ["red box", "dog"]},
            {"id": "e", "image": "img/a.png", "prompt": "p", "objects": []},
        ],
    )
    recs = read_prompt_records(f).records
    assert recs[0] == PromptRecord(
        id="q", image=world / "img" / "a.png", prompt="p", objects=("red box", "dog")
    )
    assert recs[1].objects == ()
    f = _jsonl(
        world / "bad_objects.jsonl",
        [{"id": "q", "image": "img/a.png", "prompt": "p", "objects": ["dog", ""]}],
    )
    err = _raises(lambda: read_prompt_records(f), line=1, field="objects", file=f)
    assert "item 1" in err.reason


def test_pope_questions_native_and_official_layout(world: Path):
    f = _jsonl(
        world / "pope.jsonl",
        [
            {"image": "img/a.png", "question": "Is there a box?", "label": "Yes", "split": "random"},
            {"image": "img/a.png", "question": "Is there a dog?", "label": "no", "split": "adversarial"},
        ],
    )
    qs = read_pope_questions(f).records
    assert qs[0] == PopeQuestion(
        id="0", image=world / "img" / "a.png", question="Is there a box?", label="yes", split="random"
    )
    assert [q.label for q in qs] == ["yes", "no"] and qs[1].split == "adversarial"

    # The official POPE files: JSON Lines named .json, question_id/text keys, one split per file.
    off = _jsonl(
        world / "coco_pope_random.json",
        [{"question_id": 1, "image": "a.png", "text": "Is there a box?", "label": "yes"}],
    )
    q = read_pope_questions(off, image_root=world / "img", layout="pope", split="random").records[0]
    assert (q.id, q.question, q.split, q.image) == ("1", "Is there a box?", "random", world / "img" / "a.png")
    _raises(
        lambda: read_pope_questions(off, image_root=world / "img", layout="pope"),
        line=1,
        field="split",
        file=off,
    )


# --- layouts ------------------------------------------------------------------------------------------


def test_every_layout_maps_to_the_same_record(world: Path):
    native = _jsonl(world / "native.jsonl", [_pref(0, id="0")])
    mdpo = world / "mdpo.json"
    mdpo.write_text(
        json.dumps(
            [{"img_path": "img/a.png", "prompt": "Describe.", "chosen": "A red box.", "rejected": "A cat."}]
        )
    )
    inner = json.dumps({"question": "Describe.", "chosen": "A red box.", "rejected": "A cat."})
    rlhfv = _jsonl(
        world / "rlhfv.jsonl",
        [{"ds_name": "RLHF-V", "idx": 0, "image_path": "img/a.png", "text": inner, "origin_dataset": "x"}],
    )
    custom = _jsonl(
        world / "custom.jsonl",
        [{"uid": "0", "picture": "img/a.png", "q": "Describe.", "good": "A red box.", "bad": "A cat."}],
    )

    expected = read_preference_records(native).records
    assert read_preference_records(mdpo, layout="mdpo").records == expected
    assert read_preference_records(rlhfv, layout="rlhfv").records == expected
    key_map = {"id": "uid", "image": "picture", "prompt": "q", "chosen": "good", "rejected": "bad"}
    assert read_preference_records(custom, key_map=key_map).records == expected
    # key_map overrides a layout key and leaves the others in place.
    renamed = _jsonl(world / "rl2.jsonl", [{"idx": 0, "img": "img/a.png", "text": inner}])
    assert read_preference_records(renamed, layout="rlhfv", key_map={"image": "img"}).records == expected


def test_mdpo_ids_are_item_positions_and_errors_name_its_keys(world: Path):
    f = world / "mdpo.json"
    rows = [{"img_path": "img/a.png", "prompt": "p", "chosen": "c", "rejected": "r"} for _ in range(3)]
    del rows[2]["img_path"]
    f.write_text(json.dumps(rows))
    _raises(lambda: read_preference_records(f, layout="mdpo"), line=3, field="img_path", file=f)
    res = read_preference_records(f, layout="mdpo", on_bad_record="skip")
    assert [r.id for r in res.records] == ["0", "1"]


def test_rlhfv_inner_json_errors(world: Path):
    f = _jsonl(world / "r.jsonl", [{"idx": 0, "image_path": "img/a.png", "text": "{not json"}])
    err = _raises(lambda: read_preference_records(f, layout="rlhfv"), line=1, field="text", file=f)
    assert "invalid JSON" in err.reason
    f = _jsonl(
        world / "r2.jsonl",
        [{"idx": 0, "image_path": "img/a.png", "text": json.dumps({"chosen": "c", "rejected": "r"})}],
    )
    _raises(lambda: read_preference_records(f, layout="rlhfv"), line=1, field="text.question", file=f)
    f = _jsonl(world / "r3.jsonl", [{"idx": 0, "image_path": "img/a.png", "text": "[1, 2]"}])
    _raises(lambda: read_preference_records(f, layout="rlhfv"), line=1, field="text", file=f)
    f = _jsonl(world / "r4.jsonl", [{"idx": 0, "image_path": "img/a.png"}])
    _raises(lambda: read_preference_records(f, layout="rlhfv"), line=1, field="text", file=f)
    f = _jsonl(
        world / "r5.jsonl",
        [
            {
                "idx": 0,
                "image_path": "img/a.png",
                "text": json.dumps({"question": "q", "chosen": 3, "rejected": "r"}),
            }
        ],
    )
    _raises(lambda: read_preference_records(f, layout="rlhfv"), line=1, field="text.chosen", file=f)


def test_bad_configuration_is_a_value_error(world: Path):
    f = _jsonl(world / "p.jsonl", [_pref(0)])
    with pytest.raises(ValueError, match="unknown preference layout"):
        read_preference_records(f, layout="nonesuch")
    with pytest.raises(ValueError, match="unknown field 'answer'"):
        read_preference_records(f, key_map={"answer": "x"})
    with pytest.raises(ValueError, match="on_bad_record"):
        read_preference_records(f, on_bad_record="ignore")


# --- every bad input names file, line and field ------------------------------------------------------


def test_missing_and_empty_files(tmp_path: Path):
    missing = tmp_path / "nope.jsonl"
    err = _raises(lambda: read_preference_records(missing), line=None, field=None, file=missing)
    assert "not found" in err.reason
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    err = _raises(lambda: read_preference_records(empty), line=None, field=None, file=empty)
    assert "no records" in err.reason
    arr = tmp_path / "empty.json"
    arr.write_text("[]")
    _raises(lambda: read_preference_records(arr), line=None, field=None, file=arr)
    bad_arr = tmp_path / "bad.json"
    bad_arr.write_text('[\n {"id": 1},\n {"id": \n]')
    _raises(lambda: read_preference_records(bad_arr), line=4, field=None, file=bad_arr)


@pytest.mark.parametrize(
    "row, field, fragment",
    [
        ('{"id": "x", "image": ', None, "invalid JSON"),
        ('["not", "an", "object"]', None, "expected a JSON object, got list"),
        (_pref(1, prompt=_DROP), "prompt", "missing required field"),
        (_pref(1, prompt=None), "prompt", "null"),
        (_pref(1, chosen=5), "chosen", "expected string, got integer"),
        (_pref(1, id=True), "id", "expected string or integer, got boolean"),
        (_pref(1, rejected="   "), "rejected", "empty string"),
        (_pref(1, image=""), "image", "empty string"),
        (_pref(1, image="img/missing.png"), "image", "file not found"),
        (_pref(1, image="img/truncated.png"), "image", "cannot decode"),
        (_pref(1, image="img/garbage.png"), "image", "cannot decode"),
        (_pref(1, image="img"), "image", "not a regular file"),
        (_pref(1, negatives="img/b.png"), "negatives", "expected list, got string"),
        (_pref(1, negatives=["img/b.png", "img/missing.png"]), "negatives", "item 1: file not found"),
        (_pref(1, negatives=[3]), "negatives", "item 0"),
        (_pref(1, meta=[1]), "meta", "expected object"),
        (_pref(0), "id", "duplicate id 'ex0' (first at line 1)"),
    ],
)
def test_bad_preference_line(world: Path, row, field, fragment):
    good = _png(world / "img" / "full.png", size=(64, 64))
    data = good.read_bytes()
    (world / "img" / "truncated.png").write_bytes(data[: len(data) // 2])
    (world / "img" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    f = _jsonl(world / "p.jsonl", [_pref(0), row, _pref(2)])
    err = _raises(lambda: read_preference_records(f), line=2, field=field, file=f)
    assert fragment in err.reason
    # The same file in skip mode keeps the two good records and reports the bad one.
    res = read_preference_records(f, on_bad_record="skip")
    assert [r.id for r in res.records] == ["ex0", "ex2"]
    assert len(res.skipped) == 1 and str(res.skipped[0]) == str(err)


def test_bad_pope_label(world: Path):
    f = _jsonl(
        world / "pope.jsonl", [{"image": "img/a.png", "question": "q?", "label": "maybe", "split": "random"}]
    )
    err = _raises(lambda: read_pope_questions(f), line=1, field="label", file=f)
    assert "'maybe'" in err.reason


def test_json_array_errors_use_item_index(world: Path):
    f = world / "p.json"
    f.write_text(json.dumps([_pref(0), _pref(1), _pref(2, chosen="")], indent=2))
    _raises(lambda: read_preference_records(f), line=3, field="chosen", file=f)


def test_duplicate_ids_across_explicit_and_positional(world: Path):
    # Record 0 has no id (so "0"); record 1 claims id 0 explicitly.
    f = _jsonl(
        world / "caps.jsonl",
        [{"image": "img/a.png", "caption": "a"}, {"id": 0, "image": "img/a.png", "caption": "b"}],
    )
    _raises(lambda: read_caption_records(f), line=2, field="id", file=f)


# --- skip mode ----------------------------------------------------------------------------------------


def test_skip_mode_counts_and_warns_once(world: Path, caplog):
    rows = [_pref(i) for i in range(10)]
    rows[2] = "{broken"
    rows[5] = _pref(5, chosen=1)
    rows[7] = _pref(7, image="img/missing.png")
    f = _jsonl(world / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="misp.data.records"):
        res = read_preference_records(f, on_bad_record="skip")
    assert len(res.records) == 7
    assert [(e.line, e.field) for e in res.skipped] == [(3, None), (6, "chosen"), (8, "image")]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].getMessage().startswith(f"skipped 3 of 10 records in {f}: first: {f}:3: ")


def test_skip_mode_raises_when_every_record_is_bad(world: Path):
    f = _jsonl(world / "p.jsonl", [_pref(0, chosen=""), "nonsense"])
    err = _raises(lambda: read_preference_records(f, on_bad_record="skip"), line=None, field=None, file=f)
    assert "all 2 records are invalid" in err.reason


def test_record_error_pickles():
    err = RecordError("/x/f.jsonl", 3, "image", "file not found")
    back = pickle.loads(pickle.dumps(err))
    assert (back.file, back.line, back.field, back.reason, str(back)) == (
        Path("/x/f.jsonl"),
        3,
        "image",
        "file not found",
        "/x/f.jsonl:3: field 'image': file not found",
    )
    assert str(RecordError("f.jsonl", 2, None, "invalid JSON")) == "f.jsonl:2: invalid JSON"
    assert isinstance(err, ValueError)


# --- images -------------------------------------------------------------------------------------------


def test_verify_and_load(tmp_path: Path):
    good = _png(tmp_path / "g.png", color=(1, 2, 3))
    assert verify_image(good) is None
    gray = tmp_path / "l.png"
    Image.new("L", (5, 4), 77).save(gray)
    im = load_rgb(gray)
    assert im.mode == "RGB" and im.size == (5, 4) and im.getpixel((0, 0)) == (77, 77, 77)

    jpg = tmp_path / "t.jpg"
    Image.effect_noise((128, 96), 64).convert("RGB").save(jpg, quality=90)
    data = jpg.read_bytes()
    assert verify_image(jpg) is None
    # A small JPEG is judged by its own size, not by the 1/8-scale decode that checks it (16 px -> 2 px).
    small = tmp_path / "s.jpg"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(small)
    assert verify_image(small) is None
    tiny = tmp_path / "tiny.jpg"
    Image.new("RGB", (3, 16), (9, 9, 9)).save(tiny)
    assert "3x16 pixels" in verify_image(tiny)
    # A truncated JPEG passes PIL's verify() but must still be caught.
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert verify_image(cut) is not None
    with pytest.raises(ImageReadError, match=str(cut)):
        load_rgb(cut)
    assert verify_image(tmp_path / "none.png") == "file not found"
    with pytest.raises(FileNotFoundError, match="none.png"):
        load_rgb(tmp_path / "none.png")


# --- Shapes-MMVP pairs and likelihood-grounding records ---------------------------------------------------


def _pair(**over) -> dict:
    row = {"id": "p0", "image_a": "img/a.png", "image_b": "img/b.png", "question": "is there a red circle?",
           "answer_a": "yes", "answer_b": "No", "attribute": "color"}
    return {k: v for k, v in {**row, **over}.items() if v is not _DROP}


def test_mmvp_pairs_read_and_errors_name_file_line_field(world: Path):
    f = _jsonl(world / "mmvp.jsonl", [_pair(), _pair(id="p1", answer_a="no", answer_b="yes", attribute="size")])
    pairs = read_mmvp_pairs(f).records
    assert pairs[0] == MMVPPair("p0", world / "img/a.png", world / "img/b.png", "is there a red circle?",
                                "yes", "no", "color")
    assert pairs[1].attribute == "size"
    bad = _jsonl(world / "bad.jsonl", [_pair(), _pair(id="p1", answer_b="yes")])
    err = _raises(lambda: read_mmvp_pairs(bad), line=2, field="answer_b", file=bad)
    assert "must differ" in err.reason
    bad = _jsonl(world / "bad.jsonl", [_pair(image_b="img/missing.png")])
    _raises(lambda: read_mmvp_pairs(bad), line=1, field="image_b", file=bad)
    bad = _jsonl(world / "bad.jsonl", [_pair(answer_a="maybe")])
    _raises(lambda: read_mmvp_pairs(bad), line=1, field="answer_a", file=bad)
    bad = _jsonl(world / "bad.jsonl", [_pair(attribute=_DROP)])
    _raises(lambda: read_mmvp_pairs(bad), line=1, field="attribute", file=bad)


def _grounding(**over) -> dict:
    row = {"id": "g0", "image": "img/a.png", "prompt": "describe the image.", "caption": "a red circle.",
           "counterfactuals": ["img/b.png"], "attributes": ["color"]}
    return {k: v for k, v in {**row, **over}.items() if v is not _DROP}


def test_grounding_records_read_and_errors_name_file_line_field(world: Path):
    f = _jsonl(world / "grounding.jsonl", [_grounding()])
    [rec] = read_grounding_records(f).records
    assert rec == GroundingRecord("g0", world / "img/a.png", "describe the image.", "a red circle.",
                                  (world / "img/b.png",), ("color",))
    bad = _jsonl(world / "bad.jsonl", [_grounding(), _grounding(id="g1", attributes=["color", "size"])])
    err = _raises(lambda: read_grounding_records(bad), line=2, field="attributes", file=bad)
    assert "2 attributes for 1 counterfactuals" in err.reason
    bad = _jsonl(world / "bad.jsonl", [_grounding(counterfactuals=[], attributes=[])])
    _raises(lambda: read_grounding_records(bad), line=1, field="counterfactuals", file=bad)
    bad = _jsonl(world / "bad.jsonl", [_grounding(counterfactuals=["img/nope.png"])])
    err = _raises(lambda: read_grounding_records(bad), line=1, field="counterfactuals", file=bad)
    assert "item 0" in err.reason


def test_eval_data_refuses_an_unknown_attribute_with_its_line(world: Path):
    from misp.data.eval_data import EvalData, eval_datasets

    f = _jsonl(world / "mmvp.jsonl", [_pair(), _pair(id="p1", attribute="texture")])
    _raises(lambda: eval_datasets(EvalData(mmvp_file=str(f))), line=2, field="attribute", file=f)
    g = _jsonl(world / "grounding.jsonl", [_grounding(attributes=["hue"])])
    _raises(lambda: eval_datasets(EvalData(grounding_file=str(g))), line=1, field="attributes", file=g)
    [mmvp] = eval_datasets(EvalData(mmvp_file=str(_jsonl(world / "ok.jsonl", [_pair()]))))
    row = mmvp[0]
    assert row["task"] == "mmvp" and row["image"].size == row["image_b"].size == (16, 12)
