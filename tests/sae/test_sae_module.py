"""SAEModule trained through `misp fit` with the shipped SAE config, for both architectures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from misp.cli import main
from misp.sae.io import load_sae

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["topk", "kl"])
def test_sae_fit_logs_metrics_and_exports(architecture, tiny_world, clip_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(ROOT / "configs/shapes/sae.yaml"),
        f"--data.records_file={tiny_world / 'pref.jsonl'}", f"--data.pool={tiny_world / 'pool.jsonl'}",
        f"--data.clip.checkpoint={clip_dir}", "--data.mining.n_candidates=8", "--data.mining.dup_threshold=0.99999",
        "--data.sae_batch_size=32", "--data.progress=false", f"--model.init_args.architecture={architecture}",
        "--model.init_args.n_latents=32", "--model.init_args.top_k=4", "--model.init_args.dead_after=64",
        "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])
    export = tmp_path / "runs/shapes/sae/export"
    sae, meta = load_sae(export)
    assert sae.config.architecture == architecture and sae.config.d_in == 16 * 16
    assert meta["joint"]["projected"] is False and meta["identity"]
    rows = list(csv.DictReader(open(next((tmp_path / "runs/shapes/sae").rglob("metrics.csv")))))
    names = {k for r in rows for k, v in r.items() if v}
    assert {"val/fvu", "val/l0", "val/dead_fraction", "val/recon_cosine", "train/loss"} <= names
    if architecture == "kl":
        assert "val/mean_activation" in names
    else:
        # Decoder directions stay unit-norm through training (the topk SAE's invariant).
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32), rtol=1e-4, atol=1e-4)
    assert json.loads((export / "sae.json").read_text())["config"]["n_latents"] == 32
