"""Faults injected into real `misp fit` runs: SIGKILL mid-epoch and resume, a NaN loss, a full disk.

The SIGKILL test runs `python -m misp.cli fit` as a subprocess three times on the smoke artifacts (MISP-DPO:
SAE-selected negatives, importance-sampled from a proposal that trains during the epoch): uninterrupted,
killed with SIGKILL in the middle of epoch 0, and resumed with `--ckpt_path last`. On the CPU the resumed
run is bitwise the uninterrupted one: the same batches (the sampler skips exactly the batches done), the
same negatives (the epoch's proposal log q is in the checkpoint), the same weights, optimizer and
reference cache (restored), and the same kernels in the same order.
"""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from misp.checkpoints import read_checkpoint
from misp.cli import main
from misp.demo import method_configs

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 4


def _merged(base: dict, over: dict) -> dict:
    """``over`` on top of ``base`` as two ``--config`` files compose (mappings merge, the rest replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _config(root: Path, world: Path, clip: Path, sae: Path, vlm: Path, kill_at: int | None = None) -> Path:
    """configs/shapes/preference.yaml + methods/misp_dpo.yaml at smoke size, checkpointing every 2 steps, logging every step, under ``root``."""
    config = _merged(yaml.safe_load((ROOT / "configs/shapes/preference.yaml").read_text()),
                     yaml.safe_load((ROOT / "configs/methods/misp_dpo.yaml").read_text()))
    trainer = config["trainer"] | {
        "max_epochs": 2, "limit_train_batches": STEPS_PER_EPOCH, "limit_val_batches": 0, "log_every_n_steps": 1,
        "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
        "default_root_dir": str(root),
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "logs"}},
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "every_n_train_steps": 2,
                                     "save_top_k": -1}}],
    }
    if kill_at is not None:
        trainer["callbacks"].append({"class_path": "fault_helpers.KillAt", "init_args": {"step": kill_at}})
    config["trainer"] = trainer
    config["model"]["init_args"] |= {"vlm": {"path": str(vlm)}, "export_dir": None, "lr": 1e-3}
    config["data"]["init_args"] |= {
        "records_file": str(world / "pref.jsonl"), "pool": str(world / "pool.jsonl"), "clip": {"checkpoint": str(clip)},
        "sae_path": str(sae), "cache_dir": str(root.parent / "cache"), "batch_size": 4, "progress": False,
        "preview_records": 0, "mining": {"n_candidates": 8, "pool_size": 4, "dup_threshold": 0.99999},
        "evaluation": {"pope_file": str(world / "pope.jsonl"), "captions_file": str(world / "test.jsonl")},
        "validation": {"pope_file": str(world / "val_pope.jsonl"), "captions_file": str(world / "val.jsonl")},
    }
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1",
                        "MISP_LOG_LEVEL": "WARNING"}
    return subprocess.run([sys.executable, "-m", "misp.cli", "fit", "--config", str(config), *extra],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=300)


def _losses(root: Path) -> dict[int, float]:
    """train/loss by global step, over every version of the run's CSV logs."""
    out = {}
    for path in sorted((root / "logs").rglob("metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_bitwise(tiny_world, clip_dir, sae_dir, vlm_dir, tmp_path):
    full_root, part_root = tmp_path / "full", tmp_path / "part"
    run = _fit(_config(full_root, tiny_world, clip_dir, sae_dir, vlm_dir))
    assert run.returncode == 0, run.stderr[-3000:]

    killed = _fit(_config(part_root, tiny_world, clip_dir, sae_dir, vlm_dir, kill_at=3))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert read_checkpoint(part_root / "checkpoints/last.ckpt")["global_step"] == 2  # mid-epoch 0

    resumed = _fit(_config(part_root, tiny_world, clip_dir, sae_dir, vlm_dir), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr

    full, part = _losses(full_root), _losses(part_root)
    assert sorted(full) == list(range(2 * STEPS_PER_EPOCH))
    # Steps 0-2 ran before the kill (step 2 twice: once killed, once resumed); every step equals.
    assert sorted(part) == sorted(full) and all(part[s] == full[s] for s in full), (full, part)
    a = read_checkpoint(full_root / "checkpoints/last.ckpt")
    b = read_checkpoint(part_root / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * STEPS_PER_EPOCH
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.slow
def test_a_nan_loss_stops_training_naming_step_and_records(tiny_world, vlm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ckpt_dir = tmp_path / "runs/shapes/dpo/checkpoints"
    args = [
        "fit", *method_configs("dpo", ROOT),
        f"--model.init_args.vlm.path={vlm_dir}", "--model.init_args.export_dir=null",
        f"--data.records_file={tiny_world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
        f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={tiny_world / 'val.jsonl'}",
        "--trainer.max_steps=6", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--data.batch_size=4", "--data.progress=false",
        "--data.preview_records=0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt_dir}", "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks+=fault_helpers.PoisonLoss", "--trainer.callbacks.step=3",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "misp: error: the training loss is nan at global step 3 (epoch 0, batch 3); record ids: pref-" in err, err
    assert "Traceback" not in err
    # The last checkpoint is step 3's (after 3 good updates), finite and complete.
    last = read_checkpoint(ckpt_dir / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_a_failed_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    from misp.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    io.save_checkpoint({"pytorch-lightning_version": "2", "state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    real_fdopen = os.fdopen

    class FullDisk:  # a disk that fills up half-way through the next checkpoint
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"pytorch-lightning_version": "2", "state_dict": {"w": torch.zeros(1 << 16)}}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


def test_misp_trainers_write_checkpoints_atomically_and_guard_the_loss(tmp_path, monkeypatch):
    from misp.callbacks import FiniteLossGuard
    from misp.checkpoints import AtomicCheckpointIO
    from misp.cli import MispCLI

    monkeypatch.chdir(tmp_path)
    cli = MispCLI(args=["--config", str(ROOT / "configs/shapes/clip.yaml"), "--data.train_file=x.jsonl"], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, FiniteLossGuard) for c in cli.trainer.callbacks)
