"""MISPDPOModule under FSDP2 (ModelParallelStrategy, fully_shard per decoder layer), 2 gloo processes on CPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from misp.demo import method_configs
from misp.models.vlm import VLMSpec, load_vlm

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.distributed
def test_dpo_trains_sharded_over_two_processes(tiny_world, vlm_dir, tmp_path):
    args = [
        sys.executable, "-m", "misp.cli", "fit", *method_configs("mdpo", ROOT),
        f"--model.init_args.vlm.path={vlm_dir}", f"--data.records_file={tiny_world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
        f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={tiny_world / 'val.jsonl'}",
        "--trainer.accelerator=cpu", "--trainer.devices=2",
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size=2", "--trainer.strategy.tensor_parallel_size=1",
        "--trainer.max_steps=3", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=4",
        "--data.progress=false", "--data.preview_records=0",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "MISP_LOG_LEVEL": "WARNING"}
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    metrics = next((tmp_path / "runs/shapes/mdpo").rglob("metrics.csv"))
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(metrics)) if r.get("train/loss")]
    assert len(losses) == 3
    # The export gathered the sharded weights into one ordinary checkpoint.
    model, _ = load_vlm(VLMSpec(path=str(tmp_path / "runs/shapes/mdpo/export")))
    assert sum(p.numel() for p in model.parameters()) > 0
