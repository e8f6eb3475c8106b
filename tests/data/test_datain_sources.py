"""Preference sets as published (issue 22): each layout, saved as parquet with embedded images and read
through `datasets`, gives the same encoded pairs as the equivalent misp JSON Lines; conversations; bad rows
named by dataset, split and row; embedded images stored once by content; a 100k-row parquet read within
a stated memory bound; `misp data inspect`; `misp fit` straight from an RLAIF-V-layout parquet."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
from datasets import Dataset, Image, List  # noqa: E402

from misp.data.layouts import RatingRule  # noqa: E402
from misp.data.record_source import jsonl_lines  # noqa: E402
from misp.data.records import RecordError, read_preference_records  # noqa: E402
from misp.models.prompting import IGNORE_INDEX, encode_example, format_prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N = 6


def _world_rows(world: Path, n: int = N) -> list[dict]:
    rows = [json.loads(line) for _, line in jsonl_lines((world / "pref.jsonl").read_text()) if line.strip()][:n]
    return [{"id": str(i), "image": str(world / r["image"]), "prompt": r["prompt"], "chosen": r["chosen"],
             "rejected": r["rejected"], "negative": str(world / r["meta"]["counterfactuals"][0])} for i, r in enumerate(rows)]


def _embedded(path: str) -> dict:
    return {"bytes": Path(path).read_bytes(), "path": None}


def _parquet(tmp: Path, name: str, rows: list[dict], images: dict[str, object]) -> Path:
    ds = Dataset.from_list(rows)
    for column, feature in images.items():
        ds = ds.cast_column(column, feature)
    path = tmp / f"{name}.parquet"
    ds.to_parquet(str(path))
    return path


def _user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text}]}


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def _rated(r: dict) -> list[dict]:
    def c(response: str, rating: int, model: str) -> dict:
        aspects = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
        return {"annotations": {a: {"Rating": str(rating), "Rationale": "x"} for a in aspects}, "model": model,
                "response": response}
    return [c(r["rejected"], 1, "m1"), c(r["chosen"], 5, "m0"), c(r["rejected"] + " maybe", 3, "m2")]


LAYOUTS = {
    # layout: (row builder from a misp row, image columns cast to Image, id-bearing)
    "rlaifv": (lambda r: {"ds_name": "x", "image": _embedded(r["image"]), "question": r["prompt"], "chosen": r["chosen"],
                          "rejected": r["rejected"], "origin_dataset": "x", "origin_split": "{}", "idx": "7",
                          "image_path": "x.png"}, {"image": Image()}),
    "trl": (lambda r: {"prompt": [_user(r["prompt"])], "chosen": _assistant(r["chosen"]),
                       "rejected": _assistant(r["rejected"]), "images": [_embedded(r["image"])]}, {"images": List(Image())}),
    "trl-standard": (lambda r: {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                                "images": [_embedded(r["image"])]}, {"images": List(Image())}),
    "sharegpt": (lambda r: {"conversations": [{"from": "human", "value": "<image>" + r["prompt"]}],
                            "chosen": {"from": "gpt", "value": r["chosen"]}, "rejected": {"from": "gpt", "value": r["rejected"]},
                            "images": [_embedded(r["image"])]}, {"images": List(Image())}),
    "swift": (lambda r: {"messages": [{"role": "user", "content": "<image>" + r["prompt"]},
                                      {"role": "assistant", "content": r["chosen"]}],
                         "rejected_response": r["rejected"], "images": [_embedded(r["image"])],
                         "rejected_images": [_embedded(r["negative"])]}, {"images": List(Image()), "rejected_images": List(Image())}),
    "povid": (lambda r: {"id": r["id"], "image": r["image"], "conversations": [{"from": "human", "value": "<image>\n" + r["prompt"]}],
                         "chosen": r["chosen"], "rejected": r["rejected"]}, {}),
    "vlfeedback": (lambda r: {"id": r["id"], "prompt": r["prompt"], "img_path": r["image"], "models": ["m1", "m0", "m2"],
                              "completions": _rated(r)}, {}),
    "mdpo": (lambda r: {"img_path": _embedded(r["image"]), "prompt": r["prompt"], "chosen": r["chosen"],
                        "rejected": r["rejected"]}, {"img_path": Image()}),
    # The hub rows embed the image; their image_path names the authors' disk.
    "rlhfv-hub": (lambda r: {"idx": int(r["id"]), "image": _embedded(r["image"]), "image_path": "RLHF-V/img/x.jpg",
                             "text": json.dumps({"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})},
                  {"image": Image()}),
    "rlhfv": (lambda r: {"idx": int(r["id"]), "image_path": r["image"], "ds_name": "RLHF-V",
                         "text": json.dumps({"question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})}, {}),
}


def _misp_jsonl(tmp: Path, rows: list[dict], negatives: bool) -> Path:
    path = tmp / f"misp-{negatives}.jsonl"
    lines = [{"id": r["id"], "image": r["image"], "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
              **({"negatives": [r["negative"]]} if negatives else {})} for r in rows]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _encoded(processor, records) -> list:
    return [tuple(tuple(encode_example(processor, r.prompt, getattr(r, side), history=r.history).values())
                  for side in ("chosen", "rejected")) for r in records]


@pytest.fixture(scope="module")
def processor(vlm_dir):
    from misp.data.inspect import load_processor

    return load_processor({"path": str(vlm_dir)})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_published_layout_gives_the_pairs_of_its_misp_jsonl(layout, tiny_world, tmp_path, processor):
    rows = _world_rows(tiny_world)
    build, images = LAYOUTS[layout]
    path = _parquet(tmp_path, layout, [build(r) for r in rows], images)
    store = tmp_path / "store"
    got = read_preference_records(path, layout=layout.split("-")[0], image_store=store)
    want = read_preference_records(_misp_jsonl(tmp_path, rows, negatives=layout == "swift"))
    assert got.split == "train" and got.lines == list(range(N))
    assert [(r.id, r.prompt, r.chosen, r.rejected, r.history) for r in got] == \
           [(r.id, r.prompt, r.chosen, r.rejected, r.history) for r in want]
    assert _encoded(processor, got) == _encoded(processor, want)
    # The same pixels: embedded bytes were stored as they were, under their content's name.
    assert [Path(r.image).read_bytes() for r in got] == [Path(r.image).read_bytes() for r in want]
    assert [[Path(p).read_bytes() for p in r.negatives] for r in got] == [[Path(p).read_bytes() for p in r.negatives] for r in want]
    if layout == "rlaifv":  # streamed row groups give the same records as the memory-mapped table
        streamed = read_preference_records(path, layout="rlaifv", image_store=store, streaming=True)
        assert streamed.records == got.records and streamed.lines == got.lines
    if layout == "vlfeedback":
        assert got.records[0].meta == {"chosen_model": "m0", "chosen_score": 5.0, "rejected_model": "m1", "rejected_score": 1.0}


def test_a_multi_turn_record_scores_only_its_last_assistant_turn(tiny_world, tmp_path, processor):
    [r] = _world_rows(tiny_world, 1)
    turns = [{"role": "user", "content": "describe the image."}, {"role": "assistant", "content": r["rejected"]},
             {"role": "user", "content": r["prompt"]}]
    jsonl = tmp_path / "multi.jsonl"
    jsonl.write_text(json.dumps({"id": "0", "image": r["image"], "prompt": turns, "chosen": r["chosen"],
                                 "rejected": r["rejected"]}) + "\n")
    [rec] = read_preference_records(jsonl).records
    assert rec.prompt == r["prompt"] and rec.history == (("user", "describe the image."), ("assistant", r["rejected"]))
    text = format_prompt(rec.prompt, processor, rec.history)
    assert text == f"USER: <image>\ndescribe the image. ASSISTANT: {r['rejected']} USER: {r['prompt']} ASSISTANT:"
    enc = encode_example(processor, rec.prompt, r["chosen"], history=rec.history)
    # The conversation's text is encoded as it is rendered: the same ids as the rendered text given whole.
    assert enc == encode_example(processor, text, r["chosen"])
    scored = [t for t, label in zip(enc["input_ids"], enc["labels"], strict=True) if label != IGNORE_INDEX]
    assert scored == encode_example(processor, r["prompt"], r["chosen"])["input_ids"][-len(scored):]
    # Only the chosen answer (and EOS) carries labels: the earlier assistant turn is context.
    n_response = len(encode_example(processor, r["prompt"], r["chosen"])["input_ids"]) - \
        len(encode_example(processor, r["prompt"])["input_ids"])
    assert len(scored) == n_response
    # The same conversation in TRL's conversational layout, from parquet, is the same record.
    trl = _parquet(tmp_path, "multi", [{"prompt": [{"role": t["role"], "content": [{"type": "text", "text": t["content"]}]}
                                                   for t in turns], "chosen": _assistant(r["chosen"]),
                                        "rejected": _assistant(r["rejected"]), "images": [_embedded(r["image"])]}],
                   {"images": List(Image())})
    [same] = read_preference_records(trl, layout="trl", image_store=tmp_path / "store").records
    assert (same.prompt, same.history) == (rec.prompt, rec.history)
    assert format_prompt(same.prompt, processor, same.history) == text


def _bad(path: Path, layout: str, tmp: Path, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        read_preference_records(path, layout=layout, image_store=tmp / "store", **kw)
    return info.value


def test_bad_rows_name_the_dataset_split_and_row(tiny_world, tmp_path):
    rows = _world_rows(tiny_world, 3)
    rlaifv, images = LAYOUTS["rlaifv"]
    # A missing column: one line for the dataset, before any row is read.
    no_question = [{k: v for k, v in rlaifv(r).items() if k != "question"} for r in rows]
    err = _bad(_parquet(tmp_path, "noq", no_question, images), "rlaifv", tmp_path)
    assert (err.split, err.line, err.field) == ("train", None, "question") and "missing column" in err.reason
    assert str(err).startswith(f"{tmp_path / 'noq.parquet'} [split train]: field 'question': missing column")
    # key_map names the column instead.
    renamed = [{("q" if k == "question" else k): v for k, v in rlaifv(r).items()} for r in rows]
    assert len(read_preference_records(_parquet(tmp_path, "ren", renamed, images), layout="rlaifv",
                                       key_map={"prompt": "q"}, image_store=tmp_path / "store")) == 3
    # An image that cannot be decoded.
    broken = [rlaifv(r) for r in rows]
    broken[1]["image"] = {"bytes": b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "path": None}
    path = _parquet(tmp_path, "broken", broken, images)
    err = _bad(path, "rlaifv", tmp_path)
    assert (err.line, err.field) == (1, "image") and "cannot decode" in err.reason
    assert str(err).startswith(f"{path} [split train] row 1: field 'image': cannot decode")
    skipped = read_preference_records(path, layout="rlaifv", image_store=tmp_path / "store", on_bad_record="skip")
    assert [r.id for r in skipped] == ["0", "2"] and [(e.line, e.field) for e in skipped.skipped] == [(1, "image")]
    # A conversation that does not end with an assistant turn.
    swift, swift_images = LAYOUTS["swift"]
    rows_swift = [swift(r) for r in rows]
    rows_swift[2]["messages"] = rows_swift[2]["messages"][:1]
    err = _bad(_parquet(tmp_path, "sw", rows_swift, swift_images), "swift", tmp_path)
    assert (err.line, err.field) == (2, "messages") and "does not end with an assistant turn" in err.reason
    # Chosen equal to rejected.
    same = [rlaifv(r) for r in rows]
    same[0]["rejected"] = same[0]["chosen"]
    err = _bad(_parquet(tmp_path, "same", same, images), "rlaifv", tmp_path)
    assert (err.line, err.field) == (0, "rejected") and "identical to 'chosen'" in err.reason
    # A rating rule that yields no pair.
    vlf, _ = LAYOUTS["vlfeedback"]
    rated = [vlf(r) for r in rows]
    path = _parquet(tmp_path, "vlf", rated, {})
    err = _bad(path, "vlfeedback", tmp_path, ratings=RatingRule(min_gap=5.0))
    assert (err.line, err.field) == (0, "completions") and "the rating rule yields no pair" in err.reason
    kept = read_preference_records(path, layout="vlfeedback", ratings=RatingRule(aspects=("Helpfulness",), min_gap=2.5))
    assert [r.rejected for r in kept] == [r["rejected"] for r in rows]  # 5 - 1 >= 2.5, 5 - 3 < 2.5
    # An unknown split, named with the dataset.
    err = _bad(path, "vlfeedback", tmp_path, dataset_split="validation")
    assert err.split == "validation" and err.line is None


def test_embedded_images_are_stored_once_by_content(tiny_world, tmp_path, processor):
    from misp.data.pixel_cache import PixelCache, pixel_values

    rows = _world_rows(tiny_world, 3)
    rlaifv, images = LAYOUTS["rlaifv"]
    doubled = [rlaifv(r) for r in rows + rows]  # every image twice, under other rows' ids
    path = _parquet(tmp_path, "twice", doubled, images)
    read = read_preference_records(path, layout="rlaifv", image_store=tmp_path / "store")
    paths = [r.image for r in read]
    assert paths[:3] == paths[3:] and len(set(paths)) == 3
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == sorted(p.name for p in set(paths))
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    again = read_preference_records(path, layout="rlaifv", image_store=tmp_path / "store")
    assert [r.image for r in again] == paths and {p: p.stat().st_mtime_ns for p in paths} == stamps  # not rewritten
    # The pixel cache (and the CLIP cache, which fingerprints the same files) hold each content once.
    cache = PixelCache.from_mb(16)
    pixels = pixel_values(processor, paths, cache)
    assert len(cache) == 3 and pixels.shape[0] == 6 and (pixels[:3] == pixels[3:]).all()


def test_a_dataset_column_is_a_pool(tiny_world, tmp_path):
    from misp.data.pool import read_pool

    rows = _world_rows(tiny_world, 4)
    path = _parquet(tmp_path, "pool", [{"image": _embedded(r["image"])} for r in rows], {"image": Image()})
    pool = read_pool(path, image_store=tmp_path / "store")
    assert [p.read_bytes() for p in pool] == [Path(r["image"]).read_bytes() for r in rows]


def test_jsonl_lines_split_on_newline_only(tmp_path):
    row = {"id": "a\u2028b\u0085c\x0cd", "image": "x.png", "prompt": "p", "chosen": "c", "rejected": "r"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(row | {"id": "2"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    read = read_preference_records(path, verify_images=False)
    assert [r.id for r in read] == [row["id"], "2"] and read.lines == [1, 2]


def test_a_100k_row_parquet_reads_within_a_memory_bound(tiny_world, tmp_path):
    """100 000 RLAIF-V rows (8 distinct embedded images) read with under 2 KB of Python heap per row at the
    peak, records included: the table is memory-mapped, never loaded whole, and each image is stored once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 100_000
    rows = _world_rows(tiny_world, 8)
    blobs = [Path(r["image"]).read_bytes() for r in rows]
    image = pa.array([{"bytes": blobs[i % 8], "path": None} for i in range(n)],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({"image": image, "question": pa.array(["describe the image."] * n),
                      "chosen": pa.array([rows[i % 8]["chosen"] for i in range(n)]),
                      "rejected": pa.array([rows[i % 8]["rejected"] for i in range(n)])})
    meta = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}, "question": {"dtype": "string", "_type": "Value"},
                                        "chosen": {"dtype": "string", "_type": "Value"}, "rejected": {"dtype": "string", "_type": "Value"}}}}).encode()}
    path = tmp_path / "big.parquet"
    pq.write_table(table.replace_schema_metadata(meta), path)
    del table, image
    tracemalloc.start()
    read = read_preference_records(path, layout="rlaifv", image_store=tmp_path / "store")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(read) == n and len({r.image for r in read}) == 8
    assert peak < 2048 * n, f"peak Python heap {peak / 2**20:.0f} MiB for {n} rows"


def _override(tmp: Path, world: Path, vlm: Path) -> Path:
    import yaml

    config = {
        "trainer": {
            "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0, "accelerator": "cpu", "log_every_n_steps": 1,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp / "run"), "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp / "run" / "checkpoints"), "save_last": True}}],
        },
        "model": {"init_args": {"vlm": {"path": str(vlm)}, "export_dir": str(tmp / "run" / "export")}},
        "data": {"init_args": {
            "cache_dir": str(tmp / "cache"), "batch_size": 2, "progress": False, "preview_records": 0, "val_limit": 4,
            "evaluation": {"pope_file": str(world / "pope.jsonl"), "captions_file": str(world / "test.jsonl")},
            "validation": {"pope_file": str(world / "val_pope.jsonl"), "captions_file": str(world / "val.jsonl")},
        }},
    }
    path = tmp / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rlaifv_parquet(tmp: Path, world: Path, n: int) -> Path:
    build, images = LAYOUTS["rlaifv"]
    return _parquet(tmp, "rlaifv-train", [build(r) for r in _world_rows(world, n)], images)


BASE = ["--config", "configs/shapes/preference.yaml", "--config", "configs/methods/dpo.yaml"]


def test_misp_data_inspect_tells_what_the_fit_will_see(tiny_world, vlm_dir, processor, tmp_path, monkeypatch, capsys):
    from misp.cli import main
    from misp.models.prompting import num_image_tokens

    build, images = LAYOUTS["rlaifv"]
    rows = [build(r) for r in _world_rows(tiny_world, 8)]
    rows[3]["image"] = {"bytes": b"not an image", "path": None}
    rows[5]["rejected"] = rows[5]["chosen"]
    rows = [{("query" if k == "question" else k): v for k, v in row.items()} for row in rows]  # key_map names it
    path = _parquet(tmp_path, "inspect", rows, images)
    monkeypatch.chdir(ROOT)
    main(["data", "inspect", *BASE, "--config", str(_override(tmp_path, tiny_world, vlm_dir)),
          "--data.init_args.records_file", str(path), "--data.init_args.layout", "rlaifv",
          "--data.init_args.key_map", '{"prompt": "query"}', "--data.init_args.max_length", "20"])
    out = capsys.readouterr().out
    assert f"records: {path} [split train]  (layout rlaifv)" in out
    assert "rows read 8, valid 6, skipped 2, cannot be encoded 0" in out
    assert f"{path} [split train] row 3: field 'image': cannot decode" in out
    assert f"{path} [split train] row 5: field 'rejected': identical to 'chosen'" in out
    assert "a fit with on_bad_record=raise stops at the first" in out
    assert "by reason: cannot decode image x1, identical to 'chosen' x1" in out
    assert f"image tokens per image: {num_image_tokens(processor)}" in out
    # Every pair is longer than 20 tokens (the image alone is more), so truncation=skip skips them all.
    assert "max_length 20: 6 pairs are longer, so skipped (truncation: skip); 0 pairs train" in out
    assert not (tmp_path / "run").exists()  # no Trainer, no model


def test_fit_trains_straight_from_an_rlaifv_parquet(tiny_world, vlm_dir, tmp_path, monkeypatch):
    import csv
    import math

    from misp.checkpoints import read_checkpoint
    from misp.cli import main

    path = _rlaifv_parquet(tmp_path, tiny_world, 8)
    monkeypatch.chdir(ROOT)
    main(["fit", *BASE, "--config", str(_override(tmp_path, tiny_world, vlm_dir)),
          "--data.init_args.records_file", str(path), "--data.init_args.layout", "rlaifv"])
    losses = [float(r["train/loss"]) for p in (tmp_path / "run" / "logs").rglob("metrics.csv")
              for r in csv.DictReader(open(p)) if r.get("train/loss")]
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert len(list((tmp_path / "cache" / "images").iterdir())) == 8  # the embedded images, once each
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_the_shipped_llava_config_reads_an_rlaifv_parquet_as_its_fit_would(tiny_world, tmp_path, monkeypatch, capsys):
    """``configs/llava.yaml`` as shipped, only its records swapped for an RLAIF-V parquet with embedded images:
    ``misp data inspect`` reads and encodes them through the fit's own code with LLaVA-1.5's processor (from
    an offline hub cache standing in for llava-hf/llava-1.5-7b-hf), with no conversion step."""
    from misp.cli import main
    from misp.testing.hub_cache import use_hub_cache
    from misp.testing.llava15 import build_llava15, write_hub_cache

    model, processor = build_llava15()
    write_hub_cache(model, processor, tmp_path / "hub")
    path = _rlaifv_parquet(tmp_path, tiny_world, 6)
    monkeypatch.chdir(tmp_path)  # the config's relative run and cache folders land here
    with use_hub_cache(tmp_path / "hub"):
        main(["data", "inspect", "--config", str(ROOT / "configs/llava.yaml"),
              "--data.init_args.records_file", str(path), "--data.init_args.layout", "rlaifv"])
    out = capsys.readouterr().out
    assert f"records: {path} [split train]  (layout rlaifv)" in out
    assert "rows read 6, valid 6, skipped 0, cannot be encoded 0" in out
    assert "image tokens per image: 576" in out  # LLaVA-1.5's 336 px crop in 14 px patches
