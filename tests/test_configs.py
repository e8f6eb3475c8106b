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


BASES = ["configs/shapes/preference.yaml", "configs/llava.yaml", "configs/qwen25vl.yaml"]
"""The preference bases: a world's and the real models'. Each is method-free and takes any method file."""


def test_there_are_configs():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    stages = {f"shapes/{n}.yaml" for n in ("clip", "sft", "sae", "preference")}
    # The methods are whatever files configs/methods/ holds (misp.methods); the paper's are among them.
    methods = {p.relative_to(ROOT / "configs").as_posix() for p in METHODS}
    assert {f"methods/{n}.yaml" for n in ("dpo", "mdpo", "chip", "random_neg", "misp_dpo")} <= methods
    assert stages | {"llava.yaml", "llava_sae.yaml", "qwen25vl.yaml"} <= names
    tools = {p.relative_to(ROOT / "configs").as_posix() for p in ALL_CONFIGS} - names
    # Method files layer on a preference base (loaded together below), and so do a world's sides of a method
    # (<method>_data.yaml); prefs configs belong to `misp prefs`; a method's own SAE layers on sae.yaml;
    # experiments belong to `misp experiment`, their ablation files layer on a method.
    experiments = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs/experiments").rglob("*.yaml")}
    assert "experiments/shapes.yaml" in experiments
    world_sides = {"shapes/clip_dpo_data.yaml", "shapes/misp_mixed_data.yaml", "shapes/misp_ground_data.yaml"}
    # world files belong to `misp world --world` (configs/worlds/)
    worlds = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs/worlds").glob("*.yaml")}
    assert tools == methods | experiments | world_sides | worlds | {
        "shapes/clip_dpo_prefs.yaml", "shapes/misp_mixed_sae.yaml", "shapes/misp_ground_sae.yaml"}


def _printed(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def _shipped_experiment() -> dict:
    return yaml.safe_load((ROOT / "configs/experiments/shapes.yaml").read_text())


@pytest.mark.parametrize("variant", _shipped_experiment()["methods"] + _shipped_experiment()["ablations"],
                         ids=lambda v: v["name"])
def test_every_variant_of_the_shipped_experiment_is_a_consistent_method(variant, capsys, monkeypatch):
    """Each method and ablation `misp experiment` trains composes (base + method + the world's side of it +
    its extra files + its settings) into a method that builds, as the runner will build it."""
    from misp.dpo.method import build_method

    monkeypatch.chdir(ROOT)
    args = [a for path in methods.run_configs(variant["method"], Path("configs/shapes")) for a in ("--config", str(path))]
    for extra in variant.get("extra", []):
        args += ["--config", extra]
    for key, value in variant.get("set", {}).items():
        args += [f"--{key}", str(value)]
    printed = _printed(args, capsys)
    build_method(printed["model"]["init_args"]["method"])
    for key, value in variant.get("set", {}).items():
        node = printed
        for part in key.split("."):
            node = node[part]
        assert node == value


def test_an_ablation_overrides_one_term_by_key(capsys, monkeypatch):
    """jsonargparse replaces a dict-typed value across --config files wholesale; misp merges the method's
    terms key by key, so lambda_quarter.yaml changes the text weight and keeps MISP-DPO's other terms, in order."""
    from misp.dpo.method import build_method

    monkeypatch.chdir(ROOT)
    printed = _printed(["--config", "configs/shapes/preference.yaml", "--config", "configs/methods/misp_dpo.yaml",
                        "--config", "configs/experiments/ablations/lambda_quarter.yaml"], capsys)
    method = build_method(printed["model"]["init_args"]["method"])
    assert [(key, type(t).__name__, t.weight) for key, t in method.terms.items()] == [
        ("image", "PlackettLuce", 1.0), ("text", "TextDPO", 0.25), ("proposal", "ProposalFit", 1.0)]
    assert method.terms["image"].importance_sampling and method.negatives.k == 3
    # null drops a term; a later command-line option still wins over the merged files.
    printed = _printed(["--config", "configs/shapes/preference.yaml", "--config", "configs/methods/misp_dpo.yaml",
                        "--config", "configs/experiments/ablations/image_only.yaml",
                        "--model.init_args.method.terms.image.init_args.weight=2.0"], capsys)
    terms = printed["model"]["init_args"]["method"]["terms"]
    assert list(terms) == ["image", "proposal"] and terms["image"]["init_args"]["weight"] == 2.0


def test_two_method_files_are_refused(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", BASES[0], "--config", "configs/methods/dpo.yaml", "--config", "configs/methods/mdpo.yaml",
              "--print_config"])
    assert exit_info.value.code == 2 and "names 2 method files" in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_print_config_resolves_every_shipped_config(config, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    printed = _printed(["--config", str(config)], capsys)
    original = yaml.safe_load(config.read_text())
    assert printed["model"]["class_path"] == original["model"]["class_path"]
    assert printed["data"]["class_path"] == original["data"]["class_path"]


@pytest.mark.parametrize("base", BASES)
def test_every_method_layers_on_every_base(base, capsys, monkeypatch):
    """A method file says the method once and nothing of a world; a base says everything else and no
    method (alone, it runs misp.methods.DEFAULT_METHOD), so every method layers on every base."""
    from misp.dpo.method import build_method

    monkeypatch.chdir(ROOT)
    alone = _printed(["--config", base], capsys)
    assert alone["model"]["init_args"]["method"] is None  # the module runs DEFAULT_METHOD
    data = alone["data"]["init_args"]
    assert data["pool"] and data["clip"] and data["sae_path"]  # the resources any method may read
    for method in METHODS:
        printed = _printed(["--config", base, "--config", str(method)], capsys)
        said = yaml.safe_load(method.read_text())["model"]["init_args"]["method"]
        built = build_method(printed["model"]["init_args"]["method"])
        assert built.beta == said["beta"] and list(built.terms) == list(said["terms"])
        assert printed["data"]["init_args"] == data and printed["trainer"] == alone["trainer"]


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
    assert "method" not in config["model"]["init_args"]  # a method-free base: it runs DEFAULT_METHOD alone
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
