"""``misp experiment``: planning, choosing on the validation split, resuming, the report; and a real quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from misp import pipeline
from misp.errors import ConfigError, UserError
from misp.experiment import Experiment, ExperimentConfig, Variant
from misp.experiment.cli import run_experiment
from misp.experiment.config import BETA, LR
from misp.experiment.report import compare, verdict

REPO = Path(__file__).resolve().parents[2]


def _arg(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


class FakeMisp:
    """Stands in for the ``misp`` subprocesses: writes what each command would leave, records the calls.

    Validation results make beta 0.5 with lr 1e-4 the best point of every method; test results depend
    on the seed, so the report has a spread to show.
    """

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_on = fail_on

    def __call__(self, cmd, check, cwd):
        args = cmd[3:]  # after python -m misp.cli
        self.calls.append(args)
        cwd = Path(cwd)
        sub, root = args[0], _arg(args, "--trainer.default_root_dir")
        if self.fail_on and self.fail_on in " ".join(args) and "--ckpt_path" not in args:
            (cwd / root / "checkpoints").mkdir(parents=True, exist_ok=True)
            (cwd / root / "checkpoints/last.ckpt").write_text("half")
            raise subprocess.CalledProcessError(1, cmd)
        if sub == "world":
            out = cwd / _arg(args, "--out")
            out.mkdir(parents=True, exist_ok=True)
            (out / "world.json").write_text(json.dumps({"config": {"seed": 0, "n_test": 200, "n_val": 200}}))
        elif sub == "prefs":
            target = cwd / "runs/shapes/clip_dpo/prefs.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}\n")
        elif sub == "fit" and root is None:
            stage = Path([a for flag, a in zip(args, args[1:]) if flag == "--config"][-1]).stem
            target = cwd / f"runs/shapes/{stage}/export"
            target.mkdir(parents=True, exist_ok=True)
            (target / "sae.json").write_text("{}")
        elif sub == "fit":
            (cwd / root / "checkpoints").mkdir(parents=True, exist_ok=True)
            (cwd / root / "checkpoints/last.ckpt").write_text("done")
            (cwd / root / "fit_done.json").write_text(json.dumps({"global_step": 4}))  # misp fit's finish mark
            logs = cwd / root / "logs/version_0"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / "metrics.csv").write_text("step,img/accuracies,train/loss\n0,0.5,1.0\n1,1.0,0.5\n")
        elif sub in ("validate", "test"):
            base = cwd / (root or "runs/shapes/sft")
            base.mkdir(parents=True, exist_ok=True)
            beta, lr = float(_arg(args, f"--{BETA}") or 0.1), float(_arg(args, f"--{LR}") or 1e-4)
            seed = int(_arg(args, "--seed_everything") or 0)
            f1 = 0.5 + beta * lr * 1000 + (0.01 * seed if sub == "test" else 0.0)
            name = "validation_results.json" if sub == "validate" else "test_results.json"
            (base / name).write_text(json.dumps({"chair/object_f1": f1, "chair/chair_i": 0.3 - 0.01 * seed}))


def _config(tmp_path: Path, **kw) -> ExperimentConfig:
    settings = dict(
        name="t", workspace=str(tmp_path / "ws"), configs=str(REPO / "configs/shapes"), seeds=[0, 1],
        grid={BETA: [0.1, 0.5], LR: [5e-5, 1e-4]},
        methods=[Variant("dpo", "dpo"), Variant("misp_dpo", "misp_dpo")],
        ablations=[Variant("misp_k1", "misp_dpo", set={"model.init_args.method.negatives.k": 1})],
        report=str(tmp_path / "report/results.md"),
    )
    return ExperimentConfig(**(settings | kw)).resolved()


def _runs(fake: FakeMisp, sub: str) -> list[list[str]]:
    return [c for c in fake.calls if c[0] == sub and "--trainer.default_root_dir" in c]


def test_tunes_on_validation_then_trains_the_chosen_values_on_every_seed(tmp_path, monkeypatch):
    fake = FakeMisp()
    monkeypatch.setattr(pipeline, "run_child", fake)
    summary = Experiment(_config(tmp_path)).execute()
    assert summary["chosen"] == {"dpo": {"beta": 0.5, "lr": 1e-4}, "misp_dpo": {"beta": 0.5, "lr": 1e-4}}
    validated = _runs(fake, "validate")
    tested = _runs(fake, "test")
    assert len(validated) == 2 * 4  # every grid point of both methods, on the first seed only
    assert {_arg(c, "--seed_everything") for c in validated} == {"0"}
    # every method and ablation on every seed, on test, with the chosen values; nothing else is tested
    assert len(tested) == 3 * 2
    assert all(_arg(c, f"--{BETA}") == "0.5" and _arg(c, f"--{LR}") == "0.0001" for c in tested)
    assert sorted(_arg(c, "--data.init_args.seed") for c in tested) == ["0", "0", "0", "1", "1", "1"]
    # the ablation changes one setting, on its method's chosen values
    k1 = [c for c in tested if "misp_k1" in _arg(c, "--trainer.default_root_dir")]
    assert len(k1) == 2 and all(_arg(c, "--model.init_args.method.negatives.k") == "1" for c in k1)
    # the chosen point's seed-0 fit is the tuning fit itself (fits: 8 tuning + 1 more seed x 2 + ablation x 2)
    assert len(_runs(fake, "fit")) == 8 + 2 + 2
    rows = [json.loads(x) for x in (tmp_path / "ws/results.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows if r["phase"] == "tune"} == {"val"}
    assert all(r["training"]["img/accuracies"] == {"first": 0.5, "last": 1.0, "mean": 0.75} for r in rows if r["phase"] != "base")


def test_resumes_without_redoing_finished_runs_and_reruns_what_a_change_touches(tmp_path, monkeypatch):
    fake = FakeMisp()
    monkeypatch.setattr(pipeline, "run_child", fake)
    Experiment(_config(tmp_path)).execute()
    fake.calls.clear()
    Experiment(_config(tmp_path)).execute()
    assert fake.calls == []  # everything was done
    # one more seed: only its runs (2 methods + 1 ablation), nothing of the chain or of tuning
    Experiment(_config(tmp_path, seeds=[0, 1, 2])).execute()
    assert {c[0] for c in fake.calls} == {"fit", "test"}
    assert {_arg(c, "--seed_everything") for c in fake.calls} == {"2"}
    assert len(_runs(fake, "fit")) == 3
    # a changed ablation setting reruns that ablation only
    fake.calls.clear()
    config = _config(tmp_path, seeds=[0, 1, 2])
    config.ablations[0].set["model.init_args.method.negatives.k"] = 2
    Experiment(config).execute()
    assert {"misp_k1" in _arg(c, "--trainer.default_root_dir") for c in fake.calls} == {True}


def test_a_fit_that_died_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    fake = FakeMisp(fail_on="misp_k1/beta0.5_lr0.0001-s1")
    monkeypatch.setattr(pipeline, "run_child", fake)
    with pytest.raises(subprocess.CalledProcessError):
        Experiment(_config(tmp_path)).execute()
    fake.fail_on = None
    fake.calls.clear()
    Experiment(_config(tmp_path)).execute()
    fits = _runs(fake, "fit")
    assert len(fits) == 1 and _arg(fits[0], "--ckpt_path") == "runs/shapes/exp/misp_k1/beta0.5_lr0.0001-s1/checkpoints/last.ckpt"
    # a checkpoint left by an attempt with other settings is never resumed from
    config = _config(tmp_path)
    config.ablations[0].set["model.init_args.method.negatives.k"] = 2
    fake.fail_on = "misp_k1/beta0.5_lr0.0001-s0"
    with pytest.raises(subprocess.CalledProcessError):
        Experiment(config).execute()
    fake.fail_on = None
    config.ablations[0].set["model.init_args.method.negatives.k"] = 3
    fake.calls.clear()
    Experiment(config).execute()
    assert all("--ckpt_path" not in c for c in _runs(fake, "fit"))


def test_the_report_shows_mean_and_spread_and_the_protocol(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run_child", FakeMisp())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text(json.dumps({
        "name": "t", "workspace": "ws", "configs": str(REPO / "configs/shapes"), "seeds": [0, 1],
        "grid": {BETA: [0.1, 0.5]}, "methods": [{"name": "dpo", "method": "dpo"}, {"name": "misp_dpo", "method": "misp_dpo"}],
        "metrics": ["chair/object_f1", "chair/chair_i"], "report": "out/results.md",
    }))
    run_experiment(["--config", "exp.yaml"])
    report = (tmp_path / "out/results.md").read_text()
    # test f1 = 0.5 + 0.5 * 1e-4 * 1000 + 0.01 * seed over seeds 0, 1: mean 0.555, std 0.00707
    assert "| DPO | 0.555 ± 0.007 | 0.295 ± 0.007 | beta 0.5 |" in report
    assert "validation split" in report and "misp experiment --config exp.yaml" in report
    assert (tmp_path / "out/results.png").stat().st_size > 1000
    assert (tmp_path / "out/results.jsonl").read_text() == (tmp_path / "ws/results.jsonl").read_text()
    # the report can be remade from the raw rows alone
    (tmp_path / "out/results.md").unlink()
    run_experiment(["--config", "exp.yaml", "--report_only", "true"])
    assert "| DPO | 0.555 ± 0.007" in (tmp_path / "out/results.md").read_text()


def test_comparison_is_a_difference_of_means_with_its_standard_error():
    rows = [{"variant": v, "split": "test", "metrics": {"chair/chair_i": x}}
            for v, xs in (("a", [0.1, 0.2, 0.3]), ("b", [0.4, 0.5, 0.6])) for x in xs]
    diff, se = compare(rows, "a", "b", "chair/chair_i")
    assert diff == pytest.approx(-0.3) and se == pytest.approx((2 * 0.01 / 3) ** 0.5)
    assert verdict(diff, se, "chair/chair_i") == "main better"  # lower CHAIR_i is better
    assert verdict(diff, se, "chair/recall") == "main worse"
    assert verdict(0.01, se, "chair/recall") == "within spread"


def test_contradictory_experiments_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="main method 'misp_dpo' is not among"):
        Experiment(_config(tmp_path, main="misp_dpo").__class__(
            name="t", configs=str(REPO / "configs/shapes"), methods=[Variant("dpo", "dpo")]).resolved())
    with pytest.raises(ConfigError, match="not found"):
        Experiment(ExperimentConfig(configs=str(REPO / "configs/shapes"),
                                    methods=[Variant("misp_dpo", "misp_dpo"), Variant("x", "no_such_method")]).resolved())
    with pytest.raises(ConfigError, match="unique"):
        Experiment(ExperimentConfig(configs=str(REPO / "configs/shapes"),
                                    methods=[Variant("misp_dpo", "misp_dpo"), Variant("misp_dpo", "dpo")]).resolved())


def test_the_shipped_experiment_config_loads_and_names_real_files(monkeypatch):
    monkeypatch.chdir(REPO)
    from misp.experiment.cli import experiment_parser

    parser = experiment_parser()
    cfg = parser.parse_args(["--config", "configs/experiments/shapes.yaml"])
    config = ExperimentConfig(**{k: getattr(parser.instantiate_classes(cfg), k) for k in ExperimentConfig.__dataclass_fields__})
    experiment = Experiment(config.resolved())  # checks every method, ablation and extra config file exists
    # the format-6 world: the response-pair methods need its captioned edits
    assert config.world == "configs/worlds/shapes_edits.yaml"
    assert experiment.config.report == "docs/results-shapes_edits.md"
    assert {v.name for v in config.methods} >= {"dpo", "mdpo", "chip", "random_neg", "clip_dpo", "misp_dpo", "symmpo",
                                                 "icvco", "lpoi", "misp_ground"}
    assert config.main == "misp_ground"
    assert config.quick_mode.world["partner_scenes"] == 8  # after the world file: small smoke splits
    quick = config.quick_version()
    assert quick.workspace.endswith("-quick") and quick.report.startswith(quick.workspace) and quick.seeds == [0]
    other = ExperimentConfig(**{**vars(config), "world": "configs/worlds/dense.yaml"}).resolved()
    assert other.workspace.endswith("shapes-dense") and other.report == "docs/results-dense.md"


@pytest.mark.slow
def test_quick_mode_runs_the_real_chain_and_methods_end_to_end(tmp_path):
    """The shipped experiment config in quick mode, cut to two methods and one ablation, through real
    ``misp`` subprocesses: every stage runs, the report is written, and a second call redoes nothing."""
    exp = tmp_path / "exp.yaml"
    exp.write_text((REPO / "configs/experiments/shapes.yaml").read_text())
    args = ["--config", str(exp), "--quick", "true", "--workspace", str(tmp_path / "ws"),
            "--configs", str(REPO / "configs/shapes"), "--world", str(REPO / "configs/worlds/shapes_edits.yaml"), "--methods",
            json.dumps([{"name": "dpo", "method": "dpo"}, {"name": "misp_dpo", "method": "misp_dpo"}]),
            "--ablations", json.dumps([{"name": "misp_k1", "method": "misp_dpo", "set": {"model.init_args.method.negatives.k": 1}}]),
            "--quick_mode.grid", json.dumps({BETA: [0.1, 0.5], LR: [1e-4]}), "--wandb", "true", "--main", "misp_dpo"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    first = subprocess.run([sys.executable, "-m", "misp.cli", "experiment", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ws-quick/results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["split"]) for r in rows) == sorted(
        [("base", "val"), ("base", "test"), ("dpo", "val"), ("dpo", "val"), ("dpo", "test"),
         ("misp_dpo", "val"), ("misp_dpo", "val"), ("misp_dpo", "test"), ("misp_k1", "test")])
    assert all("mmvp/pair_accuracy" in r["metrics"] and "chair/object_f1" in r["metrics"] for r in rows)
    misp = next(r for r in rows if r["variant"] == "misp_dpo" and r["split"] == "test")
    assert "img/accuracies" in misp["training"] and "is/ess" in misp["training"]
    # every fit and evaluation logged to W&B (offline here), grouped by experiment, with its variant and seed
    (debug_log,) = (tmp_path / "ws-quick/runs/shapes/exp/misp_k1").glob("*-s0/wandb/latest-run/logs/debug.log")
    debug = debug_log.read_text()
    assert "'experiment': 'shapes', 'variant': 'misp_k1', 'method': 'misp_dpo', 'seed': 0" in debug
    report = (tmp_path / "ws-quick/results.md").read_text()
    assert "MISP-DPO" in report and "± " not in report.split("## Methods")[1].split("##")[0]  # one seed: no spread
    second = subprocess.run([sys.executable, "-m", "misp.cli", "experiment", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "misp fit" not in second.stdout and "misp test" not in second.stdout


# --- issue 25: interrupted, untrained or misnamed work is never recorded; checks before the chain ---------
def test_a_fit_without_its_finish_mark_is_not_recorded(tmp_path, monkeypatch):
    class Unfinished(FakeMisp):  # `misp fit` exited 0 but training never reached its end
        def __call__(self, cmd, check, cwd):
            super().__call__(cmd, check, cwd)
            for mark in Path(cwd).glob("runs/shapes/exp/*/*/fit_done.json"):
                mark.unlink()

    monkeypatch.setattr(pipeline, "run_child", Unfinished())
    with pytest.raises(UserError, match=r"run dpo/beta0.1_lr5e-05-s0: `misp fit` exited without writing .*fit_done.json"):
        Experiment(_config(tmp_path)).execute()
    rows = [json.loads(x) for x in (tmp_path / "ws/results.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == {"base"}


def test_a_second_experiment_on_a_workspace_is_refused_naming_the_first(tmp_path, monkeypatch):
    from misp.utils.lock import FolderBusy, FolderLock

    fake = FakeMisp()
    monkeypatch.setattr(pipeline, "run_child", fake)
    with FolderLock(tmp_path / "ws", "misp experiment --config first.yaml"):
        with pytest.raises(FolderBusy, match=rf"ws is in use by pid {os.getpid()} on .* \(misp experiment --config first.yaml\)"):
            Experiment(_config(tmp_path)).execute()
    assert fake.calls == []
    Experiment(_config(tmp_path)).execute()  # released: the next one runs
    assert fake.calls


def test_names_grid_keys_and_select_metric_are_checked_before_the_work_they_would_waste(tmp_path, monkeypatch):
    fake = FakeMisp()
    monkeypatch.setattr(pipeline, "run_child", fake)
    with pytest.raises(ConfigError, match=r"variant name '\.\./escape' is not a plain name"):
        Experiment(_config(tmp_path, methods=[Variant("../escape", "dpo"), Variant("misp_dpo", "misp_dpo")]))
    with pytest.raises(ConfigError, match=r"grid x: value 'a/b' cannot be part of a run's folder"):
        Experiment(_config(tmp_path, grid={"x": ["a/b"]}))
    bad_key = _config(tmp_path, grid={"model.init_args.method.betta": [0.1]})
    with pytest.raises(ConfigError, match=r"variant 'dpo' .* refuses it: .*'betta'"):
        Experiment(bad_key).execute()
    bad_value = _config(tmp_path, grid={BETA: [0.1, float("inf")]})
    with pytest.raises(ConfigError, match=r"variant 'dpo' .*beta=inf: `misp fit` refuses it: Expected a <class 'float'>"):
        Experiment(bad_value).execute()
    assert fake.calls == []  # nothing ran, not even the world
    with pytest.raises(ConfigError, match=r"select_metric 'chair/f1' is not a validation metric; .*'chair/object_f1'"):
        Experiment(_config(tmp_path, select_metric="chair/f1")).execute()
    assert [c[0] for c in fake.calls] == ["world", "fit", "fit", "validate"]  # stopped at the base's validation


def test_a_rewritten_data_file_reruns_the_stage_that_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = tmp_path / "pref.jsonl"
    records.write_text('{"id": 1}\n')
    (tmp_path / "a.yaml").write_text(f"data:\n  init_args:\n    records_file: {records.name}\n")
    ran = []

    def fake(cmd, check, cwd):
        ran.append(cmd)
        (tmp_path / "out").write_text("done")

    monkeypatch.setattr(pipeline, "run_child", fake)
    runner = pipeline.StageRunner(stamps=Path(".stamps"), cwd=tmp_path)
    stage = pipeline.Stage("a", ["fit", "--config", "a.yaml"], Path("out"))
    assert runner.run(stage) and not runner.run(stage)
    records.write_text('{"id": 2}\n')  # same size, new content
    assert runner.run(stage) and len(ran) == 2


def test_a_stage_that_wrote_its_outputs_is_not_rerun_for_them(tmp_path):
    """CLIP-DPO's pairs stage as the experiment runs it: the files it writes (pairs, summary, candidates) are
    not among the inputs its fingerprint reads, so its second call finds it done (they once were, and it reran
    on every call, and with it every CLIP-DPO run)."""
    from misp.demo import own_data_stages

    (stage,) = own_data_stages("clip_dpo", REPO / "configs/shapes")
    config = __import__("yaml").safe_load((REPO / "configs/shapes/clip_dpo_prefs.yaml").read_text())
    for key in ("output_file", "summary_file", "candidates_file", "input_file"):
        (tmp_path / config[key]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / config[key]).write_text("{}\n")
    assert [p.name for p in pipeline.data_files(stage, tmp_path)] == [Path(config["input_file"]).name]


def test_report_only_reports_the_config_the_results_were_made_with(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "run_child", FakeMisp())
    monkeypatch.chdir(tmp_path)
    exp = {"name": "t", "workspace": "ws", "configs": str(REPO / "configs/shapes"), "seeds": [0, 1],
           "grid": {BETA: [0.5]}, "methods": [{"name": "dpo", "method": "dpo"}], "main": "dpo",
           "metrics": ["chair/object_f1"], "report": "out/results.md"}
    (tmp_path / "exp.yaml").write_text(json.dumps(exp))
    run_experiment(["--config", "exp.yaml"])
    (tmp_path / "exp.yaml").write_text(json.dumps(exp | {"seeds": [0, 1, 2, 3]}))
    run_experiment(["--config", "exp.yaml", "--report_only", "true"])
    assert "the config changed ['seeds']" in capsys.readouterr().err
    report = (tmp_path / "out/results.md").read_text()
    assert "[0, 1, 2, 3]" not in report and "[0, 1]" in report


def test_a_flat_world_file_is_passed_as_world_fields(tmp_path):
    from misp.cli import _world_parser

    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("seed: 7\nn_clip: 64\n")
    nested.write_text("world:\n  seed: 7\n  n_clip: 64\n")
    for path in (flat, nested):
        config = _config(tmp_path, world=str(path))
        world = next(s for s in Experiment(config).chain() if s.name == "world")
        parsed = _world_parser().parse_args(world.args[1:])
        assert (parsed.world.seed, parsed.world.n_clip) == (7, 64), world.args


def test_results_jsonl_lines_are_split_on_newlines_only(tmp_path):
    from misp.experiment.results import ResultsLog

    path = tmp_path / "results.jsonl"
    row = {"run": "a\u2028b\x85c", "split": "val", "metrics": {}}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert ResultsLog(path).rows == [row]


def test_a_method_added_with_data_of_its_own_reruns_none_of_the_others(tmp_path, monkeypatch):
    """A method whose own stage (CLIP-DPO's pairs, a mixed pool's SAE) first runs when it joins an experiment
    reruns no other method's own stage and no other method's runs; a rerun of a shared stage reruns all."""
    fake = FakeMisp()
    monkeypatch.setattr(pipeline, "run_child", fake)
    methods = [Variant("dpo", "dpo"), Variant("misp_ground", "misp_ground")]
    Experiment(_config(tmp_path, methods=methods, ablations=[], main="misp_ground")).execute()
    assert any(c[0] == "fit" and "misp_ground_sae.yaml" in " ".join(c) for c in fake.calls)
    fake.calls.clear()
    # clip_dpo sorts before misp_ground: its new pairs once forced every later stage, and so every run, again
    Experiment(_config(tmp_path, methods=[*methods, Variant("clip_dpo", "clip_dpo")], ablations=[], main="misp_ground")).execute()
    assert [c[0] for c in fake.calls if "--trainer.default_root_dir" not in c] == ["prefs"]
    assert {Path(_arg(c, "--trainer.default_root_dir")).parts[3] for c in _runs(fake, "fit")} == {"clip_dpo"}
    # a new base model reruns everything
    fake.calls.clear()
    (tmp_path / "ws/worlds/shapes/world.json").unlink()
    Experiment(_config(tmp_path, methods=[*methods, Variant("clip_dpo", "clip_dpo")], ablations=[], main="misp_ground")).execute()
    assert {Path(_arg(c, "--trainer.default_root_dir")).parts[3] for c in _runs(fake, "fit")} == {
        "dpo", "misp_ground", "clip_dpo"}
    assert sum(c[0] == "prefs" for c in fake.calls) == 1
