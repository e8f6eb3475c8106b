"""Bad inputs and faults fed through misp's public entry points: each ends in one clear error (naming the
file and line, the record or the option) or a correct run with a counted warning, never a library
traceback or a silently wrong result. The SIGKILL tests of `misp fit` are in test_faults.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from misp.cli import main
from misp.data.eval_data import EvalData
from misp.data.world import WorldConfig
from misp.data.world.generate import MANIFEST, WORLD_VERSION, load_world, write_world
from misp.models.tokenizer import read_vocabulary
from misp.smoke import SMOKE_WORLD
from misp.utils.cache import load_cache, save_cache

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
          "--n_pool", "4", "--n_test", "4"])
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
