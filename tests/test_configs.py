"""Every shipped config loads through the CLI (`misp fit --print_config`), and `misp --help` works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from misp import methods
from misp.cli import MispCLI, main

ROOT = Path(__file__).resolve().parents[1]
ALL_CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
# Training configs (LightningCLI: model + data); the others belong to tool subcommands (misp prefs).
CONFIGS = [p for p in ALL_CONFIGS if "class_path" in (yaml.safe_load(p.read_text()).get("model") or {})]
METHODS = sorted(methods.method_files(ROOT / "configs").values())


def test_there_are_configs():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    stages = {f"shapes/{n}.yaml" for n in ("clip", "sft", "sae", "preference")}
    # The methods are whatever files configs/*/methods/ holds (misp.methods); the paper's are among them.
    methods = {p.relative_to(ROOT / "configs").as_posix() for p in METHODS}
    assert {f"shapes/methods/{n}.yaml" for n in ("dpo", "mdpo", "chip", "random_neg", "misp_dpo")} <= methods
    assert stages | {"llava.yaml", "llava_sae.yaml"} <= names
    tools = {p.relative_to(ROOT / "configs").as_posix() for p in ALL_CONFIGS} - names
    # Method files add to the preference base (loaded together below); prefs configs belong to `misp prefs`;
    # a method's own SAE layers on sae.yaml; experiments belong to `misp experiment`, their ablation files
    # layer on a method.
    experiments = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs/experiments").rglob("*.yaml")}
    assert "experiments/shapes.yaml" in experiments
    assert tools == methods | experiments | {"shapes/clip_dpo_prefs.yaml", "shapes/misp_mixed_sae.yaml"}


def _shipped_experiment() -> dict:
    return yaml.safe_load((ROOT / "configs/experiments/shapes.yaml").read_text())


@pytest.mark.parametrize("variant", _shipped_experiment()["methods"] + _shipped_experiment()["ablations"],
                         ids=lambda v: v["name"])
def test_every_variant_of_the_shipped_experiment_is_a_consistent_method(variant, capsys, monkeypatch):
    """Each method and ablation `misp experiment` trains composes (base + method + its extra files + its
    settings) and passes the method check, as the runner will build it."""
    from misp.dpo.method import check_method
    from misp.dpo.objective import build_objective

    monkeypatch.chdir(ROOT)
    args = ["fit", "--config", "configs/shapes/preference.yaml", "--config", f"configs/shapes/methods/{variant['method']}.yaml"]
    for extra in variant.get("extra", []):
        args += ["--config", extra]
    for key, value in variant.get("set", {}).items():
        args += [f"--{key}", str(value)]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    objective = build_objective(printed["model"]["init_args"]["objective"])
    check_method(objective, printed["data"]["init_args"]["source"], printed["data"]["init_args"]["k"])
    for key, value in variant.get("set", {}).items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_print_config_resolves_every_shipped_config(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    original = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == original["model"]["class_path"]
    assert printed["data"]["class_path"] == original["data"]["class_path"]


@pytest.mark.parametrize("method", METHODS, ids=lambda p: p.stem)
def test_each_method_composes_with_the_preference_base(method, capsys, monkeypatch):
    """A method file says the method once; the base supplies the rest, and the run directories follow
    the method's default_root_dir."""
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/shapes/preference.yaml", "--config", str(method), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    own = yaml.safe_load(method.read_text())
    assert printed["trainer"]["default_root_dir"] == own["trainer"]["default_root_dir"] == f"runs/shapes/{method.stem}"
    assert printed["model"]["class_path"] == "misp.dpo.MISPDPOModule"
    assert printed["model"]["init_args"]["objective"]["beta"] == own["model"]["init_args"]["objective"]["beta"]
    assert printed["data"]["init_args"]["source"] == own["data"]["init_args"]["source"]


def test_run_directories_follow_default_root_dir():
    from jsonargparse import Namespace

    from misp.cli import derive_run_dirs

    config = Namespace(
        trainer=Namespace(default_root_dir="runs/x", logger=None, callbacks=[
            Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath=None)),
            Namespace(class_path="lightning.pytorch.callbacks.ModelCheckpoint", init_args=Namespace(dirpath="mine")),
        ]),
        model=Namespace(class_path="m", init_args=Namespace(export_dir=None)),
    )
    derive_run_dirs(config)
    assert config.trainer.logger.init_args.save_dir == "runs/x"
    assert [c.init_args.dirpath for c in config.trainer.callbacks] == ["runs/x/checkpoints", "mine"]  # set: kept
    assert config.model.init_args.export_dir == "runs/x/export"


def test_help_lists_trainer_and_tool_subcommands():
    out = subprocess.run([sys.executable, "-m", "misp.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("fit", "validate", "test", "predict", "world"):
        assert sub in out


def test_unknown_config_key_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"class_path": "misp.stages.SFTModule", "init_args": {"not_a_field": 1}}}))
    with pytest.raises(SystemExit):
        MispCLI(args=["fit", "--config", str(bad)], run=True)
    assert "not_a_field" in capsys.readouterr().err


def test_llava_fsdp_strategy_wraps_and_checkpoints_decoder_layers():
    """configs/llava.yaml's FSDP strategy: decoder layers as wrap and checkpoint units, adapters in units of
    their own, float32 adapters under bf16 autocast, and a 4-bit base stored as bf16 so FSDP can flatten it."""
    from jsonargparse import ArgumentParser
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from misp.models.sharding import TrainableLeafWrapPolicy
    from misp.training import FSDPStrategy

    config = yaml.safe_load((ROOT / "configs/llava.yaml").read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(FSDPStrategy, "strategy")
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": config["trainer"]["strategy"]})).strategy
    assert type(strategy) is FSDPStrategy
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, TrainableLeafWrapPolicy) and policy._module_classes == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert config["trainer"]["precision"] == "bf16-mixed"  # bf16-true would round LoRA updates away
    vlm = config["model"]["init_args"]["vlm"]
    assert vlm["load_in_4bit"] and vlm["bnb_4bit_quant_type"] == "nf4"
    assert vlm["bnb_4bit_quant_storage"] == vlm["dtype"] == "bfloat16"  # FSDP shards 4-bit weights as bf16
    assert vlm["lora"] == {"r": 64, "alpha": 128, "dropout": 0.05}


@pytest.mark.parametrize("stage", ["sft", "preference"])
def test_shapes_stages_validate_on_val_and_report_test(stage):
    """Fit validates on the world's val split (what hyperparameters may be chosen on); `misp test` reports
    the test split."""
    data = yaml.safe_load((ROOT / f"configs/shapes/{stage}.yaml").read_text())["data"]["init_args"]
    assert data["evaluation"] == {"pope_file": "worlds/shapes/pope.jsonl", "captions_file": "worlds/shapes/test.jsonl"}
    assert data["validation"] == {"pope_file": "worlds/shapes/val_pope.jsonl", "captions_file": "worlds/shapes/val.jsonl"}
