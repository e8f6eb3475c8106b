from __future__ import annotations

import json
from pathlib import Path

from misp import demo, pipeline
from misp.world.generate import MANIFEST, WORLD_VERSION


def test_a_world_from_another_version_makes_the_demo_rerun_everything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not demo.world_is_stale()  # no world yet: the world stage simply runs
    path = tmp_path / demo.WORLD / MANIFEST
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": WORLD_VERSION, "files": {}}))
    assert not demo.world_is_stale()
    path.write_text(json.dumps({"version": WORLD_VERSION - 1, "files": {}}))
    assert demo.world_is_stale()
    path.write_text("{truncated")
    assert demo.world_is_stale()


def _fake_pipeline(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 1\n")
    (tmp_path / "b.yaml").write_text("epochs: 1\n")
    return [
        demo.Stage("a", ["fit", "--config", "a.yaml"], tmp_path / "out_a"),
        demo.Stage("b", ["fit", "--config", "b.yaml"], tmp_path / "out_b"),
    ]


def _run(stages, monkeypatch) -> list[str]:
    ran = []

    def fake_run(cmd, check, **kwargs):
        config = cmd[cmd.index("--config") + 1]
        stage = next(s for s in stages if config in s.args)
        stage.done_when.write_text("done")
        ran.append(stage.name)

    monkeypatch.setattr(pipeline, "run_child", fake_run)
    force = False
    for stage in stages:
        force = demo.run_stage(stage, force) or force
    return ran


def test_the_demo_reruns_a_stage_whose_config_changed_and_everything_after_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = _fake_pipeline(tmp_path)
    assert _run(stages, monkeypatch) == ["a", "b"]
    assert _run(stages, monkeypatch) == []  # resumes: nothing left to do
    (tmp_path / "b.yaml").write_text("epochs: 2\n")
    assert _run(stages, monkeypatch) == ["b"]
    (tmp_path / "a.yaml").write_text("epochs: 2\n")
    assert _run(stages, monkeypatch) == ["a", "b"]  # b read a's output, so it reruns too
    (tmp_path / "out_b").unlink()  # an output lost (or a stage killed before writing it)
    assert _run(stages, monkeypatch) == ["b"]


def test_the_demo_finds_its_methods_in_the_configs(monkeypatch):
    """`--all-methods` runs every file in configs/methods on the Shapes preference base, no list in code, each
    in its run folder, with the world's side of the method when it has one; a method with a
    `<name>_prefs.yaml` generates its pairs first."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    methods = {p.stem for p in (root / "configs/methods").glob("*.yaml")}
    assert set(demo.baselines()) == methods - {demo.MAIN_METHOD}
    stages = {s.name: s for s in demo.pipeline(all_methods=True)}
    for name in methods:
        assert stages[name].args[:5] == ["fit", "--config", "configs/shapes/preference.yaml", "--config",
                                         f"configs/methods/{name}.yaml"]
        assert Path(stages[name].args[4]).exists() and f"--trainer.default_root_dir=runs/shapes/{name}" in stages[name].args
    assert "configs/shapes/clip_dpo_data.yaml" in stages["clip_dpo"].args
    names = list(stages)
    assert names.index("clip_dpo-prefs") < names.index("clip_dpo")
    assert demo.method_configs("sft") == ["--config", "configs/shapes/sft.yaml"]
