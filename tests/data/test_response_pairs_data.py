"""The data side of response pairs: the `edits` record field, the `edits` source, the span rule, and the
errors of a record without edits (file, line, field)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from misp.batch import NegativeRef
from misp.data.pairs import EditResponses, collate_pairs, edit_spans, encode_edits
from misp.data.records import EditedImage, RecordError, read_preference_records
from misp.negatives.edits import edit_refs, record_edits, record_targets
from misp.negatives.sources import DrawContext, get_source


def _png(path: Path, color=(200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path.name


def _rows(tmp_path: Path, rows: list[dict]) -> Path:
    f = tmp_path / "prefs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def _pref(i: int, **over) -> dict:
    return {"id": f"r{i}", "image": "pos.png", "prompt": "describe the image.", "chosen": "a red circle.",
            "rejected": "a red circle. a blue square."} | over


@pytest.fixture
def images(tmp_path: Path) -> Path:
    _png(tmp_path / "pos.png")
    _png(tmp_path / "e0.png", (0, 0, 200))
    _png(tmp_path / "e1.png", (0, 200, 0))
    return tmp_path


def test_the_span_rule_keeps_what_differs_between_prefix_and_suffix():
    # an attribute swap: the changed token in both
    assert edit_spans([1, 2, 3, 9], [1, 5, 3, 9]) == ([False, True, False, False], [False, True, False, False])
    # an object removed: its tokens in y_p, nothing in y_k (and the reverse for an insertion)
    assert edit_spans([1, 2, 7, 8, 3, 9], [1, 2, 3, 9]) == ([False, False, True, True, False, False], [False] * 4)
    assert edit_spans([1, 2, 3, 9], [1, 2, 7, 8, 3, 9])[1] == [False, False, True, True, False, False]
    # identical responses change nothing; a repeated token is not counted twice
    assert edit_spans([4, 4, 9], [4, 4, 9]) == ([False] * 3, [False] * 3)
    assert edit_spans([4, 4, 9], [4, 9]) == ([False, True, False], [False, False])  # the prefix is taken first


def test_records_carry_edits_with_their_responses(images: Path):
    f = _rows(images, [_pref(0, edits=[{"image": "e0.png", "response": "a blue circle."},
                                       {"image": "e1.png", "response": "a green circle."}]), _pref(1)])
    records = read_preference_records(f).records
    assert records[0].edits == (EditedImage(images / "e0.png", "a blue circle."),
                                EditedImage(images / "e1.png", "a green circle."))
    assert records[1].edits == ()
    assert record_edits(records[0], str(f), None) == [(str(images / "e0.png"), "a blue circle."),
                                                      (str(images / "e1.png"), "a green circle.")]
    refs = edit_refs(records[0], str(f), None)
    assert refs[1] == NegativeRef("edits", str(images / "e1.png"), 1, response="a green circle.")


@pytest.mark.parametrize("edits, fragment", [
    ([{"image": "e0.png"}], "item 0: missing 'response'"),
    ([{"image": "e0.png", "response": " "}], "item 0: 'response': expected a non-empty string"),
    ([{"image": "nope.png", "response": "a blue circle."}], "item 0: 'image'"),
    (["e0.png"], "item 0: expected an object with 'image' and 'response'"),
    ([{"image": "e0.png", "response": "a blue circle.", "target": "yes"}], "item 0: 'target': expected true or false"),
])
def test_a_bad_edit_names_the_file_line_and_field(images: Path, edits, fragment):
    f = _rows(images, [_pref(0), _pref(1, edits=edits)])
    with pytest.raises(RecordError) as e:
        read_preference_records(f)
    assert (e.value.line, e.value.field) == (2, "edits") and fragment in str(e.value) and str(f) in str(e.value)


def test_the_shapes_worlds_captioned_counterfactuals_are_read_relative_to_the_records(images: Path):
    meta = {"captioned_counterfactuals": [{"image": "e0.png", "caption": "a blue circle.", "edit": "color red->blue",
                                           "partner": False}]}
    f = _rows(images, [_pref(0, meta=meta)])
    record = read_preference_records(f).records[0]
    assert record_edits(record, str(f), None) == [(str(images / "e0.png"), "a blue circle.")]
    assert record_edits(record, str(f), "/elsewhere") == [("/elsewhere/e0.png", "a blue circle.")]
    assert record_targets(record, str(f), None) == []


def test_target_edits_are_marked_in_the_edits_field_or_by_the_worlds_partner_flag(images: Path):
    """The sae_targets source's stratum: edits with target: true, or format 6's partner insertions and removals."""
    f = _rows(images, [
        _pref(0, edits=[{"image": "e0.png", "response": "a blue circle."},
                        {"image": "e1.png", "response": "a red circle. a green square.", "target": True}]),
        _pref(1, meta={"captioned_counterfactuals": [
            {"image": "e0.png", "caption": "a blue circle.", "partner": False},
            {"image": "e1.png", "caption": "", "partner": True},  # no caption: not an edit at all
            {"image": "e1.png", "caption": "a red circle. a green square.", "partner": True}]}),
    ])
    records = read_preference_records(f).records
    assert records[0].edits[1].target and not records[0].edits[0].target
    assert record_targets(records[0], str(f), None) == [str(images / "e1.png")]
    assert record_targets(records[1], str(f), None) == [str(images / "e1.png")]


def test_a_record_without_edits_is_one_line_naming_file_line_and_field(images: Path, vlm_dir):
    from transformers import AutoProcessor

    from misp.models.prompting import encode_example

    f = _rows(images, [_pref(0, edits=[{"image": "e0.png", "response": "a blue circle."}]), _pref(1)])
    read = read_preference_records(f)
    processor = AutoProcessor.from_pretrained(str(vlm_dir))
    encoded = [tuple(encode_example(processor, r.prompt, y) for y in (r.chosen, r.rejected)) for r in read.records]
    with pytest.raises(RecordError) as e:
        encode_edits(read, list(encoded), processor, 256, "raise", str(f), None)
    assert (e.value.line, e.value.field) == (2, "edits") and "record 'r1'" in str(e.value)
    assert "\n" not in str(e.value)
    kept = list(encoded)
    pairs = encode_edits(read, kept, processor, 256, "skip", str(f), None)
    assert kept[1] is None and pairs.encoded[1] is None and set(pairs.encoded[0]) == {"a blue circle."}
    item = pairs.item(0, encoded[0][0], [NegativeRef("edits", "e0.png", 0, response="a blue circle.")] * 2)
    batch = collate_pairs([item, item], processor.tokenizer.pad_token_id)
    assert batch.responses.input_ids.shape[0] == 4 and batch.chosen_span.shape[:2] == (2, 2)
    # "red" -> "blue": one word differs, so both spans are short and the same length here
    assert batch.chosen_span[0, 0].sum() >= 1 and batch.chosen_span[0, 0].sum() == batch.own_span[0, 0].sum()


def test_the_edits_source_draws_each_records_edits_with_their_responses_reproducibly():
    lists = {"a": [NegativeRef("edits", "x.png", 0, response="x."), NegativeRef("edits", "y.png", 1, response="y.")],
             "b": [NegativeRef("edits", "z.png", 0, response="z.")]}
    ctx = DrawContext(ids=["a", "b"], k=3, seed=5, source="edits",
                      record_lists=lambda kind: [lists["a"], lists["b"]] if kind == "edits" else None)
    source = get_source("edits")
    assert source.paired_responses and source.edit_spans and source.in_context
    draws = source.draw(ctx, 0)
    assert all(ref in lists["a"] for ref in draws.refs[0]) and draws.refs[1] == lists["b"] * 3
    assert torch.allclose(draws.log_q[0], torch.full((3,), -math.log(2))) and (draws.log_q[1] == 0).all()
    assert source.draw(ctx, 0).refs == draws.refs


def test_edit_responses_item_reads_the_drawn_responses():
    chosen = {"input_ids": [1, 2, 3, 4, 9], "labels": [-100, -100, 3, 4, 9]}
    own = {"input_ids": [1, 2, 3, 5, 9], "labels": [-100, -100, 3, 5, 9]}
    pairs = EditResponses([{"y'": own}])
    item = pairs.item(0, chosen, [NegativeRef("edits", "e.png", 0, response="y'")])
    assert item["responses"] == [own]
    assert item["chosen_span"] == [[False, True, False]] and item["own_span"] == [[False, True, False]]
