"""The Shapes base stages run through the CLI with the shipped configs: a 2-step fit of each, and test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from misp.cli import main
from misp.models.clip import ClipSpec, load_clip
from misp.models.vlm import VLMSpec, load_vlm

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--trainer.max_steps=2", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.mark.slow
def test_clip_stage_fits_and_exports(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(ROOT / "configs/shapes/clip.yaml"), *FAST,
        f"--data.train_file={tiny_world / 'clip.jsonl'}", "--data.val_size=32", "--data.batch_size=16",
        "--model.init_args.clip.tiny.vision_width=32", "--model.init_args.clip.tiny.text_width=32",
        "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2",
    ])
    bundle = load_clip(ClipSpec(checkpoint=str(tmp_path / "runs/shapes/clip/export")))
    assert bundle.model.visual is not None
    metrics = (tmp_path / "runs/shapes/clip/logs/version_0/metrics.csv").read_text()
    assert "train/loss" in metrics and "val/i2t_acc" in metrics
    assert (tmp_path / "runs/shapes/clip/checkpoints/last.ckpt").exists()


@pytest.mark.slow
def test_sft_stage_fits_exports_and_tests(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "configs/shapes/sft.yaml").read_text())
    config["model"]["init_args"]["vlm"]["tiny"] = dict(  # small, and no vision_init (no CLIP export here)
        image_size=32, vision_hidden_size=32, vision_heads=2, text_hidden_size=64, text_heads=2,
        text_intermediate_size=128)
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    data = [
        f"--data.train_file={tiny_world / 'sft.jsonl'}", f"--model.init_args.vlm.vocabulary={tiny_world}",
        f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
        f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={tiny_world / 'val.jsonl'}", "--data.batch_size=8", "--data.val_limit=8",
    ]
    main(["fit", "--config", str(tmp_path / "sft.yaml"), *FAST, *data,
          "--trainer.check_val_every_n_epoch=1", "--trainer.limit_val_batches=1"])
    model, processor = load_vlm(VLMSpec(path=str(tmp_path / "runs/shapes/sft/export")))
    assert processor.tokenizer.pad_token_id is not None
    # `misp test` from the Lightning checkpoint: POPE per split and CHAIR, written as JSON.
    main(["test", "--config", str(tmp_path / "sft.yaml"), *data,
          "--data.evaluation.limit=12", "--trainer.enable_progress_bar=false",
          "--ckpt_path", str(tmp_path / "runs/shapes/sft/checkpoints/last.ckpt")])
    results = json.loads((tmp_path / "runs/shapes/sft/test_results.json").read_text())
    assert {"pope/all/accuracy", "pope/all/f1", "chair/chair_i", "chair/chair_s", "chair/recall"} <= set(results)
    # The world's bias pairs are measured beside CHAIR without any configuration.
    assert {"cooccurrence/partner_rate", "cooccurrence/other_rate", "cooccurrence/partner_share",
            "cooccurrence/partner_present_rate"} <= set(results)
    # So are the world's Shapes-MMVP pairs and likelihood grounding over its test counterfactuals.
    assert {"mmvp/pair_accuracy", "mmvp/question_accuracy", "grounding/likelihood"} <= set(results)
    assert {f"mmvp/{a}/pair_accuracy" for a in ("color", "shape", "size", "position")} <= set(results)
    assert {f"grounding/likelihood_{a}" for a in ("color", "shape", "size", "position")} <= set(results)
    assert results["mmvp/pairs"] == 12 and results["grounding/captions"] == 12
    assert all(0.0 <= v <= 1.0 for k, v in results.items() if not k.endswith(("cases", "pairs", "captions")))
    # Every answer is on disk as `misp eval` writes it, and re-scores to the reported numbers.
    generations = tmp_path / "runs/shapes/sft/generations"
    pope = [json.loads(line) for line in (generations / "pope.jsonl").read_text().splitlines()]
    assert all(set(r) == {"id", "prompt", "answer", "judgement"} for r in pope)
    right = sum(r["judgement"]["pred"] == r["judgement"]["truth"] for r in pope)
    assert results["pope/all/accuracy"] == pytest.approx(right / len(pope))
    assert len((generations / "mmvp.jsonl").read_text().splitlines()) == 12
    assert len((generations / "caption.jsonl").read_text().splitlines()) == 12


def test_sft_vision_tower_starts_from_the_clip_export(tiny_world, clip_dir, tmp_path, monkeypatch):
    """sft.yaml's vision_init: the SFT model's vision tower is the CLIP stage's image tower."""
    from misp.models.tiny_llava import TinyLlavaConfig
    from misp.stages import SFTModule

    module = SFTModule(VLMSpec(tiny=TinyLlavaConfig(vision_init=str(clip_dir)), vocabulary=str(tiny_world)))
    clip = load_clip(ClipSpec(checkpoint=str(clip_dir))).model.visual
    tower = module.model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    assert tower.embeddings.patch_embedding.weight.equal(clip.conv1.weight)


def test_eval_limit_takes_the_first_questions_of_every_pope_split(tiny_world):
    from misp.data.eval_data import EvalData, eval_datasets

    pope, captions, mmvp, grounding = eval_datasets(EvalData(pope_file=str(tiny_world / "pope.jsonl"),
                                                             captions_file=str(tiny_world / "test.jsonl"), limit=3))
    splits = [row["split"] for row in pope.rows]
    assert {s: splits.count(s) for s in set(splits)} == {"random": 3, "popular": 3, "adversarial": 3}
    assert len(captions) == 3
    # The world's MMVP pairs and grounding captions come along, limited alike; "" turns them off.
    assert (mmvp.task, len(mmvp), grounding.task, len(grounding)) == ("mmvp", 3, "likelihood", 3)
    only = eval_datasets(EvalData(captions_file=str(tiny_world / "test.jsonl"), mmvp_file="", grounding_file="", limit=3))
    assert [s.task for s in only] == ["caption"]


def test_mmvp_and_grounding_files_follow_the_captions_files_split(tiny_world, tmp_path):
    """EvalData finds the MMVP and grounding files of the captions file's own split: test.jsonl's are
    mmvp.jsonl and grounding.jsonl, val.jsonl's val_mmvp.jsonl and val_grounding.jsonl."""
    import shutil

    from misp.data.eval_data import EvalData

    test = EvalData(captions_file=str(tiny_world / "test.jsonl"))
    val = EvalData(captions_file=str(tiny_world / "val.jsonl"))
    assert (test.mmvp_path(), test.grounding_path()) == (str(tiny_world / "mmvp.jsonl"), str(tiny_world / "grounding.jsonl"))
    assert (val.mmvp_path(), val.grounding_path()) == (str(tiny_world / "val_mmvp.jsonl"), str(tiny_world / "val_grounding.jsonl"))
    # Explicit files win; "" is off.
    assert EvalData(captions_file=str(tiny_world / "val.jsonl"), mmvp_file="x.jsonl", grounding_file="").mmvp_path() == "x.jsonl"
    assert EvalData(captions_file=str(tiny_world / "val.jsonl"), grounding_file="").grounding_path() is None
    # A captions file that is no split's of the world gets no companions (never test's by default).
    shutil.copy(tiny_world / "world.json", tmp_path / "world.json")
    shutil.copy(tiny_world / "val.jsonl", tmp_path / "subset.jsonl")
    other = EvalData(captions_file=str(tmp_path / "subset.jsonl"))
    assert other.mmvp_path() is None and other.grounding_path() is None
    assert other.chair_objects() == val.chair_objects()  # the world's vocabulary still applies


def _ids(loaders) -> dict[str, set[str]]:
    return {loader.dataset.task: {row["id"].split("-")[0] for row in loader.dataset.rows} for loader in loaders}


def test_sft_data_validates_on_validation_and_tests_on_evaluation(tiny_world):
    from misp.data.eval_data import EvalData
    from misp.data.sft_data import SFTDataModule

    evaluation = EvalData(pope_file=str(tiny_world / "pope.jsonl"), captions_file=str(tiny_world / "test.jsonl"))
    validation = EvalData(pope_file=str(tiny_world / "val_pope.jsonl"), captions_file=str(tiny_world / "val.jsonl"))
    dm = SFTDataModule(train_file=str(tiny_world / "sft.jsonl"), evaluation=evaluation, validation=validation, val_limit=5)
    val, test = dm.val_dataloader(), dm.test_dataloader()
    assert _ids(val) == {"pope": {"val_pope"}, "caption": {"val"}, "mmvp": {"val_mmvp"}, "likelihood": {"val"}}
    assert _ids(test) == {"pope": {"pope"}, "caption": {"test"}, "mmvp": {"mmvp"}, "likelihood": {"test"}}
    assert len(val[1].dataset) == 5 and len(test[1].dataset) == 24  # val_limit limits validation only
    # Without `validation`, fit validates on `evaluation` (limited), as before.
    alone = SFTDataModule(train_file=str(tiny_world / "sft.jsonl"), evaluation=evaluation, val_limit=5)
    assert _ids(alone.val_dataloader()) == _ids(test) and len(alone.val_dataloader()[1].dataset) == 5


def test_the_modules_metrics_follow_the_stages_sets(vlm_dir, tiny_world):
    """fit scores the validation sets and test the evaluation sets, each with its own CHAIR vocabulary."""
    from misp.data.eval_data import EvalData
    from misp.data.sft_data import SFTDataModule
    from misp.stages import SFTModule

    module = SFTModule(VLMSpec(path=str(vlm_dir)))
    dm = SFTDataModule(train_file=str(tiny_world / "sft.jsonl"),
                       evaluation=EvalData(objects=["red circle", "blue square"]),
                       validation=EvalData(objects=["green triangle"]))
    dm.attach(module)
    module.setup("fit")
    assert module.evaluator.chair.extractor.objects == ("green triangle",)
    module.setup("test")
    assert module.evaluator.chair.extractor.objects == ("red circle", "blue square")
