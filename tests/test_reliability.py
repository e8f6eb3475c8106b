"""Bad inputs and faults fed through misp's public entry points: each ends in one clear error (naming the
file and line, the record or the option) or a correct run with a counted warning, never a library
traceback or a silently wrong result. The SIGKILL tests of `misp fit` are in test_faults.py."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from misp.cli import main
from misp.data.eval_data import EvalData
from misp.data.pool import read_pool
from misp.data.records import RecordError, read_preference_records
from misp.demo import method_configs
from misp.models.tokenizer import read_vocabulary
from misp.negatives.spec import Negatives
from misp.smoke import SMOKE_WORLD
from misp.utils.cache import load_cache, save_cache
from misp.world import WorldConfig
from misp.world.generate import MANIFEST, WORLD_VERSION, load_world, write_world

ROOT = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_002():
    old = os.umask(0o002)
    yield
    os.umask(old)


# --- item 12: atomically written files get the umask's mode, not mkstemp's 0600 ------------------------
def test_world_and_cache_files_follow_the_umask(tmp_path, umask_002):
    world = tmp_path / "world"
    main(["world", "--out", str(world), "--quiet", "true", "--n_clip", "4", "--n_sft", "4", "--n_pref", "4",
          "--n_pool", "4", "--n_test", "4", "--n_val", "4"])
    for path in [world / MANIFEST, world / "pref.jsonl", next((world / "images/pool").iterdir())]:
        assert _mode(path) == 0o664, path  # group-readable and -writable, as `open()` would make it
    save_cache(tmp_path / "c", {"x": torch.zeros(2)}, {"k": 1})
    assert _mode(tmp_path / "c.safetensors") == 0o664 and _mode(tmp_path / "c.json") == 0o664
    # Replacing a file keeps the mode its owner gave it.
    (tmp_path / "c.json").chmod(0o640)
    save_cache(tmp_path / "c", {"x": torch.ones(2)}, {"k": 2})
    assert _mode(tmp_path / "c.json") == 0o640
    assert load_cache(tmp_path / "c", {"k": 2})["x"].tolist() == [1.0, 1.0]


# --- items 2 and 3: interrupted regeneration, changed files, other versions ---------------------------
def _world_cmd(out: Path, seed: int, n_clip: int) -> list[str]:
    sizes = SMOKE_WORLD | {"seed": seed, "n_clip": n_clip}
    return [sys.executable, "-m", "misp.cli", "world", "--out", str(out), "--quiet", "true"] + [
        f"--{k}={v}" for k, v in sizes.items()
    ]


def test_a_world_regeneration_killed_half_way_is_never_trusted(tmp_path):
    out = tmp_path / "world"
    write_world(out, WorldConfig(**SMOKE_WORLD), progress=False)
    old_first = (out / "images/clip/clip-000000.png").read_bytes()
    # Regenerate another world over it and SIGKILL the process while it renders.
    proc = subprocess.Popen(_world_cmd(out, seed=1, n_clip=800), env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while (out / MANIFEST).exists() or (out / "images/clip/clip-000000.png").read_bytes() == old_first:
            assert proc.poll() is None and time.monotonic() < deadline, "the regeneration never started"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert not (out / MANIFEST).exists()  # the commit mark was withdrawn before any image was replaced
    with pytest.raises(FileNotFoundError, match="interrupted"):
        load_world(out)
    with pytest.raises(FileNotFoundError, match="vocabulary: .*world.json is missing"):
        read_vocabulary(out)  # what the SFT stage's tokenizer reads
    # Rerunning completes it: the same bytes as an uninterrupted run of the same config.
    main(_world_cmd(out, seed=1, n_clip=800)[3:])
    fresh = tmp_path / "fresh"
    write_world(fresh, WorldConfig(**(SMOKE_WORLD | {"seed": 1, "n_clip": 800})), progress=False)
    assert (out / MANIFEST).read_bytes() == (fresh / MANIFEST).read_bytes()
    assert load_world(out)["images"] == load_world(fresh)["images"]


def test_a_world_with_changed_or_mixed_in_files_is_refused(tmp_path, tiny_world):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    load_world(world)
    # An image of another world copied over one of this world's.
    other = tmp_path / "other"
    write_world(other, WorldConfig(**(SMOKE_WORLD | {"seed": 5, "n_clip": 4})), progress=False)
    shutil.copy(other / "images/pool/pool-000003.png", world / "images/pool/pool-000003.png")
    with pytest.raises(ValueError, match="images under .* differ"):
        load_world(world)
    shutil.copy(tiny_world / "images/pool/pool-000003.png", world / "images/pool/pool-000003.png")
    with (world / "pope.jsonl").open("a") as f:
        f.write("\n")
    with pytest.raises(ValueError, match="pope.jsonl differs"):
        load_world(world)


def test_a_world_of_another_version_is_refused_by_every_reader(tmp_path, tiny_world):
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    manifest = json.loads((world / MANIFEST).read_text())
    (world / MANIFEST).write_text(json.dumps(manifest | {"version": WORLD_VERSION - 1}))
    expected = f"world format version {WORLD_VERSION - 1}, this misp reads {WORLD_VERSION}"
    with pytest.raises(ValueError, match=expected):
        read_vocabulary(world)  # the SFT stage's tiny tokenizer
    evaluation = EvalData(pope_file=str(world / "pope.jsonl"), captions_file=str(world / "test.jsonl"))
    with pytest.raises(ValueError, match=expected):
        evaluation.chair_objects()  # the evaluation's CHAIR vocabulary
    with pytest.raises(ValueError, match=expected):
        evaluation.pairs()
    with pytest.raises(ValueError, match=expected):
        load_world(world)


# --- item 1: 16-bit images ------------------------------------------------------------------------------
def test_a_16_bit_png_trains_as_its_pixels_not_as_white(tmp_path, clip_dir):
    from misp.images import load_rgb
    from misp.models.clip import ClipSpec, load_clip
    from misp.negatives.embed import embed_images

    pixels = np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint16)
    Image.fromarray((pixels * 257).astype(np.uint16)).save(tmp_path / "deep.png")  # 0..65535
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(tmp_path / "flat.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "deep.png")), np.asarray(load_rgb(tmp_path / "flat.png")))
    clip = load_clip(ClipSpec(checkpoint=str(clip_dir)))
    emb = embed_images(clip, [tmp_path / "deep.png", tmp_path / "flat.png"], progress=False)
    torch.testing.assert_close(emb[0], emb[1])


# --- item 4: a same-size file copied over an image with its timestamps kept -----------------------------
def test_an_image_replaced_with_preserved_timestamps_is_embedded_again(tmp_path, clip_dir):
    from misp.models.clip import ClipSpec, load_clip
    from misp.negatives.embed import embed_images

    rng = np.random.default_rng(1)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(p, compress_level=0)
    assert a.stat().st_size == b.stat().st_size
    st = a.stat()
    clip = load_clip(ClipSpec(checkpoint=str(clip_dir)))
    first = embed_images(clip, [a, b], cache_path=tmp_path / "cache", progress=False)
    assert not torch.allclose(first[0], first[1], atol=1e-3)
    shutil.copyfile(b, a)  # `cp -p b a`: same size, and the old timestamps put back
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert a.stat().st_size == st.st_size and a.stat().st_mtime_ns == st.st_mtime_ns
    again = embed_images(clip, [a, b], cache_path=tmp_path / "cache", progress=False)
    torch.testing.assert_close(again[0], again[1])  # a's new content, not the cached embedding


# --- item 5: degenerate data and settings ---------------------------------------------------------------
def _pref_rows(world: Path, n: int = 6) -> list[dict]:
    rows = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()[:n]]
    for r in rows:
        r["image"] = str(world / r["image"])
    return rows


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_chosen_equal_to_rejected_and_1x1_images_are_bad_records(tmp_path, tiny_world):
    rows = _pref_rows(tiny_world)
    rows[2]["rejected"] = rows[2]["chosen"] + " "
    Image.new("RGB", (1, 1)).save(tmp_path / "pixel.png")
    rows[4]["image"] = str(tmp_path / "pixel.png")
    path = _write_jsonl(tmp_path / "pref.jsonl", rows)
    with pytest.raises(RecordError, match=r"pref.jsonl:3: field 'rejected': identical to 'chosen'"):
        read_preference_records(path)
    rows[2]["rejected"] = "a different caption."
    _write_jsonl(path, rows)
    with pytest.raises(RecordError, match=r"pref.jsonl:5: field 'image': image is 1x1 pixels, under the 4x4"):
        read_preference_records(path)
    result = read_preference_records(path, on_bad_record="skip")
    assert len(result) == 5 and len(result.skipped) == 1 and result.lines == [1, 2, 3, 4, 6]


def test_degenerate_pools_and_k_are_counted_warnings(tmp_path, tiny_world, clip_dir, caplog):
    from misp.data.negative_sampler import NegativeSamplerDataModule
    from misp.models.clip import ClipSpec
    from misp.negatives.mining import MiningConfig

    pool = [json.loads(line) for line in (tiny_world / "pool.jsonl").read_text().splitlines()[:5]]
    for r in pool:
        r["image"] = str(tiny_world / r["image"])
    pool.append(dict(pool[0], id="copy"))  # the same image listed twice
    _write_jsonl(tmp_path / "pool.jsonl", pool)
    dm = NegativeSamplerDataModule(
        records_file=str(tiny_world / "pref.jsonl"), pool=str(tmp_path / "pool.jsonl"),
        clip=ClipSpec(checkpoint=str(clip_dir)), mining=MiningConfig(n_candidates=8, dup_threshold=0.99999),
        cache_dir=str(tmp_path / "cache"), progress=False, preview_records=0,
    )
    dm.attach(SimpleNamespace(negatives=Negatives("random", 7)))
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    text = caplog.text
    assert "1 of 6 entries repeat an earlier image's content (first: line 6 = line 1)" in text
    assert "holds 6 images, fewer than mining.n_candidates=8" in text
    assert "holds 6 images, fewer than mining.pool_size=16" in text
    assert "k=7 negatives are drawn from fewer candidates for 48 of 48 records (fewest: 6" in text


def test_k_above_a_records_given_negatives_is_a_counted_warning(tiny_world, caplog):
    from misp.data.negative_sampler import NegativeSamplerDataModule

    dm = NegativeSamplerDataModule(records_file=str(tiny_world / "pref.jsonl"), progress=False, preview_records=0)
    dm.attach(SimpleNamespace(negatives=Negatives("counterfactual", 6)))
    dm.prepare_data()
    with caplog.at_level(logging.WARNING):
        draws = dm.draws_for_epoch(0)
    assert draws.draw_index.shape == (48, 6)
    assert "source='counterfactual': 48 of 48 records in" in caplog.text and "fewer than k=6 negatives" in caplog.text


def test_proposal_eps_zero_is_a_warning(vlm_dir, caplog):
    from misp.callbacks import SettingsCheck
    from misp.dpo import MISPDPOModule
    from misp.dpo.method import Method
    from misp.models.vlm import VLMSpec

    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("misp_dpo"), proposal_eps=0.0)
    with caplog.at_level(logging.WARNING):
        SettingsCheck().on_fit_start(None, module)
    assert "model.init_args.proposal_eps is 0" in caplog.text and "unbounded" in caplog.text


# --- item 6: checkpoints --------------------------------------------------------------------------------
def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_truncated_foreign_and_incomplete_checkpoints_are_one_clear_error(tmp_path, capsys):
    good = tmp_path / "good.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "epoch=0-step=9.ckpt"
    truncated.write_bytes(good.read_bytes()[:1500])
    foreign = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(3)}, foreign)
    sharded = tmp_path / "sharded.ckpt"
    sharded.mkdir()  # a sharded save killed before its meta.pt
    config = method_configs("dpo", ROOT)
    for path, reason in [(truncated, "cannot be read .* truncated"), (foreign, "not a Lightning checkpoint"),
                         (sharded, "a folder, but not a complete sharded checkpoint"), (tmp_path / "none.ckpt", "no such file")]:
        err = _cli_error(["test", *config, "--ckpt_path", str(path)], capsys)
        assert re.search(rf"misp: error: checkpoint {re.escape(str(path))}: {reason}", err), err


def test_a_checkpoint_of_another_method_is_refused(tmp_path, tiny_world, vlm_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "misp_dpo.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {},
                "hyper_parameters": {"_class_path": "misp.dpo.MISPDPOModule",
                                     "method": {"beta": 0.5, "negatives": {"source": "sae", "k": 3}}},
                "datamodule_hyper_parameters": {"serve": "preferences"}}, ckpt)
    err = _cli_error([
        "test", *method_configs("dpo", ROOT), "--ckpt_path", str(ckpt),
        f"--model.init_args.vlm.path={vlm_dir}", f"--data.records_file={tiny_world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
        f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={tiny_world / 'val.jsonl'}", "--data.progress=false",
    ], capsys)
    assert f"misp: error: checkpoint {ckpt} was trained by another method than this config's" in err
    assert "model.method.beta: checkpoint 0.5, config 0.1" in err
    assert "model.method.negatives.source: checkpoint 'sae', config 'none'" in err


# --- item 7: SAE exports --------------------------------------------------------------------------------
def test_broken_sae_exports_name_their_files(tmp_path, sae_dir, tiny_world, clip_dir):
    from misp.data.negative_sampler import NegativeSamplerDataModule
    from misp.models.clip import ClipSpec
    from misp.negatives.mining import MiningConfig
    from misp.sae.io import SAEFormatError, load_sae

    wrong_dim = tmp_path / "dim"
    shutil.copytree(sae_dir, wrong_dim)
    meta = json.loads((wrong_dim / "sae.json").read_text())
    meta["config"]["d_in"] += 1
    (wrong_dim / "sae.json").write_text(json.dumps(meta))
    with pytest.raises(SAEFormatError, match=rf"SAE {wrong_dim}: the weights do not match the config in sae.json"):
        load_sae(wrong_dim)
    cut = tmp_path / "cut"
    shutil.copytree(sae_dir, cut)
    data = (cut / "sae.safetensors").read_bytes()
    (cut / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match=rf"SAE {cut / 'sae.safetensors'}: cannot be read .* truncated"):
        load_sae(cut)
    bare = tmp_path / "bare"
    shutil.copytree(sae_dir, bare)
    meta = json.loads((bare / "sae.json").read_text())
    del meta["joint"]
    (bare / "sae.json").write_text(json.dumps(meta))
    dm = NegativeSamplerDataModule(
        records_file=str(tiny_world / "pref.jsonl"), pool=str(tiny_world / "pool.jsonl"),
        clip=ClipSpec(checkpoint=str(clip_dir)), sae_path=str(bare), cache_dir=str(tmp_path / "cache"),
        mining=MiningConfig(n_candidates=8, pool_size=4, dup_threshold=0.99999), progress=False,
    )
    dm.attach(SimpleNamespace(negatives=Negatives("sae", 3)))
    with pytest.raises(SAEFormatError, match=rf"SAE {bare / 'sae.json'}: no 'joint' metadata"):
        dm.prepare_data()


# --- item 8: non-finite values in caches ----------------------------------------------------------------
def test_non_finite_values_never_enter_or_leave_a_cache(tmp_path, caplog):
    from safetensors.torch import save

    from misp.utils.cache import NonFiniteCacheError
    from misp.utils.io import sha256_bytes, sha256_json

    bad = torch.zeros(5, 3)
    bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteCacheError, match=r"cache .*c.safetensors \(selection\): tensor 'scores' holds NaN or \+inf in 1 row\(s\), first at row 3"):
        save_cache(tmp_path / "c", {"scores": bad, "pad": torch.full((2,), float("-inf"))}, {"kind": "selection"})
    assert not (tmp_path / "c.safetensors").exists()
    # A cache written with NaN by something else (an older misp) is not used.
    blob = save({"scores": bad})
    (tmp_path / "d.safetensors").write_bytes(blob)
    key = {"kind": "x"}
    (tmp_path / "d.json").write_text(json.dumps({"format_version": 1, "key": key, "key_hash": sha256_json(key),
                                                 "data_sha256": sha256_bytes(blob)}))
    with caplog.at_level(logging.WARNING):
        assert load_cache(tmp_path / "d", key) is None
    assert "holds NaN or +inf" in caplog.text


def test_nan_embeddings_name_the_images(tmp_path, clip_dir):
    from misp.models.clip import ClipSpec, load_clip
    from misp.negatives.embed import embed_images

    clip = load_clip(ClipSpec(checkpoint=str(clip_dir)))
    with torch.no_grad():
        next(clip.model.visual.parameters()).fill_(float("nan"))
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"CLIP image embeddings of 1 of 1 inputs are NaN or infinite, e.g. '.*x.png'"):
        embed_images(clip, [tmp_path / "x.png"], cache_path=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache.safetensors").exists()


# --- item 9: text errors found while encoding -----------------------------------------------------------
def test_encoding_errors_name_file_line_and_record(tmp_path, tiny_world, vlm_dir, caplog):
    from misp.data.negative_sampler import NegativeSamplerDataModule
    from misp.models.vlm import VLMSpec, load_vlm

    processor = load_vlm(VLMSpec(path=str(vlm_dir)))[1]
    rows = _pref_rows(tiny_world, 8)
    cases = [(1, "prompt", "<image> <image> describe the image.", "prompt contains '<image>' 2 times"),
             (3, "chosen", "a red circle <image>.", "the response contains '<image>'")]
    for index, field, text, message in cases:
        bad = [dict(r) for r in rows]
        bad[index][field] = text
        path = _write_jsonl(tmp_path / f"pref{index}.jsonl", bad)
        dm = NegativeSamplerDataModule(records_file=str(path), progress=False, preview_records=0)
        dm.attach(SimpleNamespace(processor=processor))
        dm.prepare_data()
        expected = rf"pref{index}.jsonl:{index + 1}: field '{field}': record '{rows[index]['id']}': .*{re.escape(message)}"
        with pytest.raises(RecordError, match=expected):
            dm.setup("fit")
    dm = NegativeSamplerDataModule(records_file=str(path), progress=False, preview_records=0,
                                   on_bad_record="skip", batch_size=4)
    dm.attach(SimpleNamespace(processor=processor))
    dm.prepare_data()
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "skipped 1 of 8 records in" in caplog.text and "cannot be encoded" in caplog.text
    served = [r for batch in dm.train_dataloader() for r in batch.ids]
    assert sorted(served) == sorted(r["id"] for i, r in enumerate(rows) if i != 3)


def test_an_sft_prompt_over_max_length_names_file_line_and_record(tmp_path, tiny_world, vlm_dir):
    from types import SimpleNamespace

    from misp.data.sft_data import SFTDataModule
    from misp.models.vlm import VLMSpec, load_vlm

    processor = load_vlm(VLMSpec(path=str(vlm_dir)))[1]
    rows = [json.loads(line) for line in (tiny_world / "sft.jsonl").read_text().splitlines()[:6]]
    for r in rows:
        r["image"] = str(tiny_world / r["image"])
    rows[4]["prompt"] = "describe " * 400 + "the image."
    path = _write_jsonl(tmp_path / "sft.jsonl", rows)
    dm = SFTDataModule(train_file=str(path), max_length=64)
    dm.attach(SimpleNamespace(processor=processor))
    with pytest.raises(RecordError, match=rf"sft.jsonl:5: field 'prompt': record '{rows[4]['id']}': .*max_length"):
        dm.setup("fit")
    dm = SFTDataModule(train_file=str(path), max_length=64, on_bad_record="skip", batch_size=2)
    dm.attach(SimpleNamespace(processor=processor))
    dm.setup("fit")
    assert [r.id for r in dm.train_set.records] == [r["id"] for i, r in enumerate(rows) if i != 4]
    assert "ids" in next(iter(dm.train_dataloader()))


# --- item 10: config errors -----------------------------------------------------------------------------
def test_a_dataclass_refusal_reaches_the_user_as_its_own_message(tmp_path, tiny_world, vlm_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["fit", *method_configs("misp_dpo", ROOT), f"--model.init_args.vlm.path={vlm_dir}"]
    for option in ("n_candidates", "pool_size"):
        err = _cli_error(base + [f"--data.init_args.mining.{option}=0"], capsys)
        assert err.strip().splitlines()[-1] == f"misp: error: mining.{option} must be a positive integer, got 0", err
    err = _cli_error(base + ["--model.init_args.method.beta=-1"], capsys)
    assert err.strip().splitlines()[-2:] == ["misp: error: the method contradicts itself:",
                                             "  - method.beta must be > 0, got -1.0"], err
    err = _cli_error(["world", "--out", str(tmp_path / "w"), "--image_size", "3"], capsys)
    assert err.strip() == "misp: error: image_size must be >= 16, got 3", err


def test_a_non_utf8_byte_is_reported_by_line_and_column(tmp_path, tiny_world):
    lines = [json.dumps(r) for r in _pref_rows(tiny_world, 4)]
    data = ("\n".join(lines[:2]) + "\n").encode() + lines[2].encode().replace(b'"prompt"', b'"pr\xffompt"', 1) + b"\n"
    (tmp_path / "p.jsonl").write_bytes(data)
    column = lines[2].index('"prompt"') + 4
    with pytest.raises(RecordError, match=rf"p.jsonl:3: not UTF-8 text: byte 0xff at column {column}"):
        read_preference_records(tmp_path / "p.jsonl")
    (tmp_path / "pool.jsonl").write_bytes(b'{"image": "a.png"}\n{"image": "\xe9.png"}\n')
    with pytest.raises(RecordError, match=r"pool.jsonl:2: not UTF-8 text: byte 0xe9 at column 12"):
        read_pool(tmp_path / "pool.jsonl")


def test_misp_prefs_refuses_an_unwritable_output_before_sampling(tmp_path, tiny_world, capsys):
    (tmp_path / "file").write_text("not a folder")
    config = {"input_file": str(tiny_world / "pref.jsonl"), "output_file": str(tmp_path / "file/prefs.jsonl"),
              "vlm": {"path": str(tmp_path / "no-model")}, "clip": {"checkpoint": str(tmp_path / "no-clip")}}
    (tmp_path / "prefs.yaml").write_text(yaml.safe_dump(config))
    err = _cli_error(["prefs", "--config", str(tmp_path / "prefs.yaml")], capsys)
    # Refused before the (missing) models are even loaded.
    assert f"misp: error: output_file {tmp_path / 'file/prefs.jsonl'}: cannot be written" in err, err


# --- item 13: notebooks load checkpoints safely ---------------------------------------------------------
def test_notebooks_never_unpickle_arbitrary_objects(tmp_path):
    from misp.checkpoints import read_checkpoint
    from misp.errors import CheckpointError

    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        assert "weights_only=False" not in notebook.read_text(), notebook
    torch.save({"pytorch-lightning_version": "2.6", "payload": Path("x")}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        read_checkpoint(tmp_path / "evil.ckpt")


# --- mining caches: a build killed half-way is never trusted ---------------------------------------------
_KILL_BETWEEN_DATA_AND_SIDECAR = """
import os, signal, sys
import misp.utils.cache as cache
from misp.models.clip import ClipSpec, load_clip
from misp.negatives.embed import embed_images
real = cache.atomic_write_json
def killed(path, obj):
    os.kill(os.getpid(), signal.SIGKILL)  # the tensors are written, their commit mark is not
cache.atomic_write_json = killed
embed_images(load_clip(ClipSpec(checkpoint=sys.argv[1])), sys.argv[3:], cache_path=sys.argv[2], progress=False)
"""


def test_a_cache_build_killed_before_its_commit_mark_is_rebuilt(tmp_path, tiny_world, clip_dir):
    from misp.models.clip import ClipSpec, load_clip
    from misp.negatives.embed import embed_images

    images = sorted((tiny_world / "images/pool").iterdir())
    clip = load_clip(ClipSpec(checkpoint=str(clip_dir)))
    cache = tmp_path / "pool_image"
    embed_images(clip, images[:6], cache_path=cache, progress=False)  # an older, complete cache
    old_sidecar = (tmp_path / "pool_image.json").read_text()
    run = subprocess.run([sys.executable, "-c", _KILL_BETWEEN_DATA_AND_SIDECAR, str(clip_dir), str(cache),
                          *map(str, images[:8])], env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    assert (tmp_path / "pool_image.json").read_text() == old_sidecar  # old mark, new tensors
    assert load_cache(cache, json.loads(old_sidecar)["key"]) is None  # the old key no longer matches the data
    fresh = embed_images(clip, images[:8], progress=False)
    torch.testing.assert_close(embed_images(clip, images[:8], cache_path=cache, progress=False), fresh)
    torch.testing.assert_close(embed_images(clip, images[:6], cache_path=cache, progress=False), fresh[:6])


# --- item 11: packaging metadata without deprecated forms ----------------------------------------------
def test_pyproject_license_is_an_spdx_string():
    text = (ROOT / "pyproject.toml").read_text()
    # A TOML table here makes setuptools >= 77 print a deprecation warning on every install.
    assert re.search(r'^license = "Apache-2.0"$', text, re.M)
    assert re.search(r'^requires = \["setuptools>=77"', text, re.M)  # the first release that reads the string
