"""Every preference method fits a step on the tiny Qwen2.5-VL (hub layout), through the shipped Shapes
method configs with only the model path, files and sizes overridden; and CLIP-DPO's pairs are generated
with it. One test for the family, not one per method: the methods' own behaviour is tested on LLaVA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from misp.cli import main
from misp.demo import method_configs

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["dpo", "mdpo", "chip", "random_neg", "misp_dpo"]


def _overrides(world: Path, qwen_dir: Path) -> list[str]:
    return [
        f"--model.init_args.vlm.path={qwen_dir}", f"--data.records_file={world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={world / 'pope.jsonl'}", f"--data.evaluation.captions_file={world / 'test.jsonl'}",
        f"--data.validation.pope_file={world / 'val_pope.jsonl'}", f"--data.validation.captions_file={world / 'val.jsonl'}",
        "--trainer.max_steps=1", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=2",
        "--data.progress=false", "--data.preview_records=0",
    ]


@pytest.mark.slow
def test_every_method_fits_a_step_on_tiny_qwen25vl(tiny_world, clip_dir, sae_dir, qwen_dir, tmp_path, monkeypatch):
    import csv

    for method in METHODS:
        run = tmp_path / method
        run.mkdir()
        monkeypatch.chdir(run)
        args = ["fit", *method_configs(method, ROOT), *_overrides(tiny_world, qwen_dir)]
        if method in ("random_neg", "misp_dpo"):
            args += [f"--data.pool={tiny_world / 'pool.jsonl'}", f"--data.clip.checkpoint={clip_dir}",
                     "--data.mining.n_candidates=8", "--data.mining.pool_size=4", "--data.mining.dup_threshold=0.99999"]
        if method == "misp_dpo":
            args += [f"--data.sae_path={sae_dir}"]
        main(args)
        rows = list(csv.DictReader(open(next((run / "runs").rglob("metrics.csv")))))
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert losses and all(math.isfinite(x) for x in losses), method
        names = {k for r in rows for k, v in r.items() if v}
        assert ("loss/image" in names) == (method != "dpo"), (method, names)
        assert (run / f"runs/shapes/{method}/export/config.json").exists(), method


def test_clip_dpo_pairs_are_generated_with_tiny_qwen25vl(tiny_world, clip_dir, qwen_dir, tmp_path):
    """``misp prefs`` (CLIP-DPO's pair generation) samples captions from Qwen2.5-VL in its own template."""
    import json

    import yaml

    from misp.data.records import read_preference_records

    config = {
        "input_file": str(tiny_world / "pref.jsonl"), "output_file": str(tmp_path / "prefs.jsonl"),
        "vlm": {"path": str(qwen_dir)}, "clip": {"checkpoint": str(clip_dir)}, "objects_key": "meta.objects",
        "objects": str(tiny_world), "limit": 4, "sampling": {"n": 3, "max_new_tokens": 8, "batch_size": 4},
        "filters": {"min_gap": 0.0, "max_tokens": 50, "max_len_ratio": 100.0}, "device": "cpu", "progress": False,
    }
    path = tmp_path / "prefs.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["prefs", "--config", str(path)])
    summary = json.loads((tmp_path / "prefs.summary.json").read_text())
    assert summary["inputs"] == 4 and summary["pairs"] > 0
    assert len(read_preference_records(tmp_path / "prefs.jsonl")) == summary["pairs"]
