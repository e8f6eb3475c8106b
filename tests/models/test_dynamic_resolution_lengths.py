"""``data.max_length`` under dynamic resolution: a Qwen row's one image placeholder counts as the tokens the
processor will give that record's image (read from the file header), in the skip/truncate/raise decision
and in ``misp data inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from misp.data.records import PreferenceRecord
from misp.models.forward import expand_image_rows
from misp.models.prompting import (
    collate_examples,
    encode_preference_records,
    example_length,
    image_token_count,
    prepare_images,
    record_image_tokens,
)
from misp.testing.qwen3vl import build_qwen3vl_processor
from misp.testing.qwen25vl import (
    Qwen25VLSizes,
    build_qwen25vl,
    build_qwen25vl_processor,
    save_qwen25vl_hub_files,
)

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
# Below min_pixels (scaled up), inside the bounds at several aspect ratios, above max_pixels (scaled down).
SIZES = [(20, 30), (56, 56), (64, 64), (84, 56), (130, 47), (200, 100), (300, 300), (1000, 90)]


@pytest.mark.parametrize("build", [build_qwen25vl_processor, build_qwen3vl_processor], ids=["qwen2.5-vl", "qwen3-vl"])
def test_image_token_count_from_the_size_is_what_the_processor_gives(build, tmp_path):
    processor = build()
    given = prepare_images(processor, [Image.new("RGB", s) for s in SIZES]).tokens_per_image.tolist()
    assert [image_token_count(processor, s) for s in SIZES] == given
    assert len(set(given)) > 3  # the sizes really give different counts
    # From a file: only its header is read.
    Image.new("RGB", SIZES[5], "red").save(tmp_path / "a.jpg")
    assert record_image_tokens(processor, [tmp_path / "a.jpg", str(tmp_path / "a.jpg")]) == [given[5]] * 2


def test_fixed_count_family_counts_its_fixed_tokens():
    from misp.models.prompting import num_image_tokens
    from misp.testing.llava15 import build_llava15_processor

    processor = build_llava15_processor()

    assert image_token_count(processor, (500, 20)) == num_image_tokens(processor)
    assert record_image_tokens(processor, [Path("/nonexistent.png")]) is None  # nothing to read


def _records(tmp: Path, sizes: list[tuple[int, int]]) -> list[PreferenceRecord]:
    out = []
    for i, size in enumerate(sizes):
        path = tmp / f"im{i}.png"
        Image.new("RGB", size, "blue").save(path)
        out.append(PreferenceRecord(f"r{i}", path, "What is in the image?", "A blue square on a white ground.",
                                    "A red circle."))
    return out


def test_max_length_counts_each_records_image_tokens(tmp_path):
    processor = build_qwen25vl_processor()
    records = _records(tmp_path, [(56, 56), (224, 224)])  # 4 and 64 image tokens
    counts = record_image_tokens(processor, [r.image for r in records])
    assert counts == [4, 64]
    full = encode_preference_records(processor, records, 10**6, image_tokens=counts)
    small, large = (max(example_length(e) for e in pair) for pair in full)
    assert large - small == 60
    limit = small + 5  # the small image's pair fits; the large one's would fit too if its image counted once

    assert max(len(e["input_ids"]) for e in full[1]) < limit  # what the check counted before
    kept = encode_preference_records(processor, records, limit, "skip", image_tokens=counts)
    assert kept[0] is not None and kept[1] is None
    with pytest.raises(ValueError, match=r"record 'r1' is \d+ tokens with its image"):
        encode_preference_records(processor, records, limit, "raise", image_tokens=counts)

    # truncate: the large record's responses are cut so that the rows the model sees are exactly max_length.
    limit = large - 3
    cut = encode_preference_records(processor, records, limit, "truncate", image_tokens=counts)
    assert cut[0] == full[0]
    rows = [e for pair in cut for e in pair]
    assert max(example_length(e) for e in rows) == limit
    batch = collate_examples(rows, processor.tokenizer.pad_token_id)
    images = prepare_images(processor, [Image.open(r.image) for r in records])
    per_row = images.tokens_per_image[torch.tensor([0, 0, 1, 1])]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    ids, mask, _ = expand_image_rows(batch["input_ids"], batch["attention_mask"], None, image_id, per_row)
    assert mask.sum(1).tolist() == [example_length(e) for e in rows]
    assert int(mask.sum(1).max()) == limit

    # A prompt whose image alone overflows leaves no room: one line naming the record.
    with pytest.raises(ValueError, match=r"record 'r1'.*image tokens"):
        encode_preference_records(processor, records, small + 2, "truncate", image_tokens=counts)


def test_misp_data_inspect_counts_each_images_tokens(tiny_world, tmp_path, monkeypatch, capsys):
    import yaml

    from misp.cli import main

    model_dir = tmp_path / "qwen"
    model, processor = build_qwen25vl(Qwen25VLSizes())
    save_qwen25vl_hub_files(model, processor, model_dir)
    records = _records(tmp_path, [(56, 56), (56, 56), (224, 224)])
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "image": str(r.image), "prompt": r.prompt, "chosen": r.chosen,
                                        "rejected": r.rejected}) + "\n" for r in records))
    counts = record_image_tokens(processor, [r.image for r in records])
    full = encode_preference_records(processor, records, 10**6, image_tokens=counts)
    small = max(example_length(e) for e in full[0])
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({
        "model": {"init_args": {"vlm": {"path": str(model_dir)}}},
        "data": {"init_args": {"records_file": str(path), "cache_dir": str(tmp_path / "cache"), "progress": False,
                               "max_length": small + 5,
                               "evaluation": {"pope_file": str(tiny_world / "pope.jsonl"), "captions_file": str(tiny_world / "test.jsonl")},
                               "validation": {"pope_file": str(tiny_world / "val_pope.jsonl"),
                                              "captions_file": str(tiny_world / "val.jsonl")}}},
    }))
    monkeypatch.chdir(ROOT)
    main(["data", "inspect", "--config", "configs/shapes/preference.yaml", "--config", "configs/methods/dpo.yaml",
          "--config", str(override)])
    out = capsys.readouterr().out
    assert "image tokens per image (from its size):" in out
    assert "image tokens           p50=4" in out and "max=64" in out
    assert f"max_length {small + 5}: 1 pairs are longer, so skipped (truncation: skip); 2 pairs train" in out


def test_sft_max_length_cuts_the_response_to_fit_with_each_records_image(tmp_path):
    from functools import partial

    from misp.data.encoding import encode_records
    from misp.data.records import ReadResult, SFTRecord
    from misp.models.prompting import encode_example

    processor = build_qwen25vl_processor()
    prefs = _records(tmp_path, [(56, 56), (224, 224)])
    read = ReadResult([SFTRecord(r.id, r.image, r.prompt, r.chosen) for r in prefs], [], tmp_path / "sft.jsonl",
                      lines=[1, 2])
    counts = record_image_tokens(processor, [r.image for r in read.records])
    (small,), (large,) = encode_records(read, ("response",), partial(encode_example, processor), "raise", counts)[1]
    limit = example_length(large) - 3  # the small record fits whole; the large one's response is cut
    _, encoded = encode_records(read, ("response",), partial(encode_example, processor, max_length=limit), "raise", counts)
    assert encoded[0][0] == small
    cut = encoded[1][0]
    assert example_length(cut) == limit and cut["input_ids"] == large["input_ids"][:-3]
