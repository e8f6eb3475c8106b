"""LPOI's method file fits end to end on the tiny world: occluded negatives drawn, ranked, and trained on."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from misp.cli import main
from misp.demo import method_configs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_lpoi_fits_on_its_occluded_negatives(tiny_world, vlm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", *method_configs("lpoi", ROOT),
        f"--model.init_args.vlm.path={vlm_dir}",
        f"--data.records_file={tiny_world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
        f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={tiny_world / 'val.jsonl'}",
        "--model.init_args.method.negatives.k=2", "--data.batch_size=2", "--data.progress=false", "--data.preview_records=0",
        "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ])
    files = sorted((tmp_path / "runs").rglob("metrics.csv"))
    assert files
    with open(files[-1]) as f:
        rows = list(csv.DictReader(f))
    names = {k for r in rows for k, v in r.items() if v}
    assert {"loss/text", "loss/ranking", "loss/anchor", "ranking/accuracies", "ranking/top_accuracies"} <= names
    assert "loss/image" not in names
    losses = torch.tensor([float(r["train/loss"]) for r in rows if r.get("train/loss")])
    assert len(losses) == 2 and torch.isfinite(losses).all()
    assert (tmp_path / "runs/shapes/lpoi/export/config.json").exists()


def test_the_cooling_ablation_composes_with_misp_dpo(capsys, monkeypatch):
    """configs/experiments/ablations/cooling.yaml on MISP-DPO: the image term cools, the rest is MISP-DPO's."""
    from misp.dpo.method import Method, build_method
    from misp.dpo.terms import Cooling, PlackettLuce

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", *method_configs("misp_dpo", ROOT), "--config", "configs/experiments/ablations/cooling.yaml",
              "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    method = build_method(printed["model"]["init_args"]["method"])  # checked as it is built
    image = method.terms["image"]
    assert isinstance(image, PlackettLuce)
    assert image.importance_sampling and image.cooling == Cooling(floor=-2.0, tau=0.5)
    assert list(method.terms) == list(Method.preset("misp_dpo").terms)
