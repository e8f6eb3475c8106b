"""The ``misp`` command: LightningCLI for every training stage, plus tool subcommands.

    misp fit --config configs/shapes/sft.yaml          any stage is `misp fit` with its config(s)
    misp fit --config configs/shapes/preference.yaml --config configs/methods/misp_dpo.yaml
    misp test --config ... --ckpt_path ...             POPE and CHAIR on the test split
    misp world --out DIR [--seed S] [...]              writes a Shapes world dataset to DIR
    misp prefs --config configs/shapes/clip_dpo_prefs.yaml   CLIP-DPO pairs sampled from a VLM
    misp experiment --config configs/experiments/shapes.yaml  every method x seeds, tuned on validation
    misp eval --model M [--adapter A] --benchmarks pope,mmvp --data_root D --out O   published benchmarks
    misp export --ckpt_path C --out O [--merge] [--push_to_hub REPO]          adapter or merged folder
    misp data inspect --config ...                      what a fit will see of its records (no weights)

Tool subcommands (``world``, ``prefs``) are not Trainer methods, so ``main`` dispatches them to their own
jsonargparse parser before LightningCLI runs; ``misp --help`` still lists them beside fit/test.

What ``MispCLI`` adds to LightningCLI, for reliability:

- every Trainer gets ``FiniteLossGuard`` (a NaN or infinite loss stops training, naming the step and the
  records) and ``SettingsCheck`` (warnings about degenerate settings), and writes checkpoints atomically
  (``misp.checkpoints.AtomicCheckpointIO``);
- ``--ckpt_path`` is checked before the Trainer loads it: a missing, truncated or foreign checkpoint, or
  one made by another method's config, is a one-line error naming it. The config's settings are used,
  not silently replaced by the checkpoint's (Lightning's default), and differences are listed;
- a config value refused by a dataclass's own check is reported with that check's message, not inside
  jsonargparse's "Does not validate against any of the Union subtypes" report;
- every Trainer also gets ``TrainsSomething`` (a fit with every learning rate 0 or without a single
  optimizer step is an error, not an export; a finished fit writes ``fit_done.json``) and
  ``FiniteWeightsCheck`` (a model with a NaN or infinite weight is not evaluated);
- option values are checked before anything loads (``misp.config_checks``): ``--config`` files as YAML
  (naming the file), non-finite numbers, learning rates, a zero budget, an ``export_dir`` that is a file;
- a SIGTERM ends ``misp`` with exit status 143 (Lightning's ``SIGTERMException`` is a ``SystemExit``
  without a code, which would be 0, "finished");
- ``main`` prints any ``misp.errors.UserError`` as one line (``misp: error: ...``, exit status 2)
  without a traceback; ``MISP_TRACEBACK=1`` shows it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from misp.callbacks import FiniteLossGuard, FiniteWeightsCheck, SettingsCheck, TrainsSomething
from misp.checkpoints import SPECIAL_PATHS, AtomicCheckpointIO, method_mismatches, read_checkpoint
from misp.config_build import instantiate_config
from misp.config_checks import check_config_files, check_pairing, check_values
from misp.config_layers import check_method_home, merged_terms_args
from misp.errors import (
    CheckpointError,
    ConfigError,
    Interrupted,
    UserError,
    innermost_reason,
    is_union_report,
)
from misp.world import WorldConfig, write_world

log = logging.getLogger("misp.cli")

# Field docstrings of misp's dataclass configs become --help text.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _world_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="misp world", description="Write a seeded Shapes world dataset (all splits).")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with WorldConfig fields.")
    parser.add_argument("--out", type=str, required=True, help="Output folder (created; files are replaced).")
    parser.add_argument("--quiet", type=bool, default=False, help="No progress bar.")
    parser.add_class_arguments(WorldConfig, "world", help="The world's generator settings.")
    return parser


def _run_world(argv: Sequence[str]) -> None:
    parser = _world_parser()
    cfg = parser.parse_args(_flatten_world_args(argv))
    config = instantiate_config(parser, cfg).world
    info = write_world(cfg.out, config, progress=not cfg.quiet)
    counts = ", ".join(f"{k} {v}" for k, v in info.get("counts", {}).items())
    print(f"wrote the Shapes world to {cfg.out}: {counts}")
    for split, n in info.get("counts", {}).get("partner_present", {}).items():
        print(f"{split}: {n['cases']} partner-present cases for partner_present_rate ({n['split_scenes']} in the "
              f"split's scenes, {n['partner_scenes']} in its partner scenes), {n['partner_removals']} partner "
              "removals for probe/partner_logp_gap")


def _flatten_world_args(argv: Sequence[str]) -> list[str]:
    """Let users write ``--seed 3`` for ``--world.seed 3``: WorldConfig fields sit at the top level."""
    fields = set(WorldConfig.__dataclass_fields__)
    out = []
    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        out.append(f"--world.{arg[2:]}" if name in fields else arg)
    return out


def _prefs_parser() -> ArgumentParser:
    from misp.prefs import PrefsConfig

    parser = ArgumentParser(
        prog="misp prefs",
        description="CLIP-DPO preference data: sample responses with the VLM, rank them with CLIP, filter, pair.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with PrefsConfig fields at the top level.")
    parser.add_class_arguments(PrefsConfig, None)
    return parser


def _run_prefs(argv: Sequence[str]) -> None:
    from misp.prefs import PrefsConfig, format_summary, run_prefs

    parser = _prefs_parser()
    cfg = parser.parse_args(list(argv))
    built = instantiate_config(parser, cfg)
    config = PrefsConfig(**{name: getattr(built, name) for name in PrefsConfig.__dataclass_fields__})
    summary = run_prefs(config)
    print(format_summary(summary))
    print(f"wrote {summary['pairs']} preference records to {config.output_file}")


def _run_experiment(argv: Sequence[str]) -> None:
    from misp.experiment.cli import run_experiment

    run_experiment(argv)


def _data_parser() -> ArgumentParser:
    from misp.data.inspect import inspect_parser

    return inspect_parser()


def _run_data(argv: Sequence[str]) -> None:
    from misp.data.inspect import run_inspect

    if not argv or argv[0] != "inspect":
        raise ConfigError("usage: misp data inspect --config FIT_CONFIG [--config ...] [--data.init_args.X VALUE ...]")
    run_inspect(list(argv[1:]))


def _experiment_parser() -> ArgumentParser:
    from misp.experiment.cli import experiment_parser

    return experiment_parser()


def _run_eval(argv: Sequence[str]) -> None:
    from misp.eval.run import run_eval

    run_eval(argv)


def _eval_parser() -> ArgumentParser:
    from misp.eval.run import eval_parser

    return eval_parser()


def _run_export(argv: Sequence[str]) -> None:
    from misp.export import run_export

    run_export(argv)


def _export_parser() -> ArgumentParser:
    from misp.export import export_parser

    return export_parser()


TOOLS: dict[str, tuple[Callable[[Sequence[str]], None], Callable[[], ArgumentParser], str]] = {
    "world": (_run_world, _world_parser, "Write a seeded Shapes world dataset to a folder."),
    "prefs": (_run_prefs, _prefs_parser, "CLIP-DPO preference data from the VLM's own samples, ranked by CLIP."),
    "data": (_run_data, _data_parser, "`misp data inspect --config ...`: what a fit will see of its records (no weights)."),
    "experiment": (_run_experiment, _experiment_parser,
                   "Every method over seeds, tuned on the validation split: results.jsonl and a report."),
    "eval": (_run_eval, _eval_parser, "A model on POPE, HallusionBench, MMVP, AMBER, Object HalBench, MMHal-Bench."),
    "export": (_run_export, _export_parser, "A checkpoint as a LoRA adapter or merged model folder (+ model card)."),
}


class MispCLI(LightningCLI):
    """LightningCLI with misp's defaults: any LightningModule/DataModule chosen by ``class_path``."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [FiniteLossGuard(), SettingsCheck(), TrainsSomething(),
                                            FiniteWeightsCheck()]},
            parser_kwargs={"env_prefix": "MISP", "default_env": False},
            args=list(args) if args is not None else None,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # Layered files merge the method's terms key by key (jsonargparse would replace the map wholesale).
        if not isinstance(args, (dict, Namespace)):
            given = sys.argv[1:] if args is None else list(args)
            check_method_home(given)
            merged = merged_terms_args(given)
            if merged != given:
                # Straight to the parser: LightningCLI warns when `args` and sys.argv are both given.
                self.config = parser.parse_args(merged)
                return
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        derive_run_dirs(config)
        check_values(config, self.subcommand)
        check_pairing(config)

    def _attach(self) -> None:
        # The one explicit handshake between the data and the module (misp.data.handshake).
        attach = getattr(self.datamodule, "attach", None)
        if attach is not None:
            attach(self.model)

    before_fit = before_validate = before_test = before_predict = _attach

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Listed for --help only: main() runs tool subcommands before LightningCLI parses anything.
        action = parser._subcommands_action
        for name, (_, make_parser, help_text) in TOOLS.items():
            action.add_subcommand(name, make_parser(), help=help_text)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as e:
            if is_union_report(e):
                raise ConfigError(innermost_reason(e)) from e
            raise

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Only the plain local writer is replaced: a user's own CheckpointIO plugin is left alone.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the config's model settings by the checkpoint's here, silently. misp keeps the
        # config's (and compares the two in _check_checkpoint); it only fills in a model the config lacks.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or ckpt_path in SPECIAL_PATHS:
            return
        read_checkpoint(ckpt_path, mmap=True)  # a missing, truncated or foreign file: one clear error
        model = self.config[sub].get("model")
        if model is None or getattr(model, "class_path", None) is None:
            super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        if ckpt_path:
            self._check_checkpoint(subcommand, ckpt_path)
        super()._run_subcommand(subcommand)

    def _check_checkpoint(self, subcommand: str, ckpt_path: str) -> None:
        """Refuse a checkpoint of another method; warn about any other setting it was trained with."""
        path = ckpt_path
        if ckpt_path in SPECIAL_PATHS:
            fn = {"fit": TrainerFn.FITTING, "validate": TrainerFn.VALIDATING, "test": TrainerFn.TESTING,
                  "predict": TrainerFn.PREDICTING}[subcommand]
            try:
                # Lightning's own resolution of last/best/hpc (private, stable across 2.x).
                path = self.trainer._checkpoint_connector._parse_ckpt_path(fn, ckpt_path, True, False)
            except Exception:  # noqa: BLE001 - Lightning raises its own clear error for these when it loads
                return
            if path is None:
                if subcommand == "fit":
                    return  # `fit --ckpt_path last` with none yet starts afresh (resume-or-start)
                raise CheckpointError(
                    f"--ckpt_path {ckpt_path}: no such checkpoint of this config's ModelCheckpoint was found, so "
                    f"`misp {subcommand}` would evaluate the untrained model; pass a checkpoint file"
                )
        ckpt = read_checkpoint(path, mmap=True)
        check_shapes(ckpt, self.model, path)
        current = {"hyper_parameters": dict(self.model.hparams)}
        if self.datamodule is not None:
            current["datamodule_hyper_parameters"] = dict(self.datamodule.hparams)
        errors, differences = method_mismatches(ckpt, current)
        if errors:
            raise CheckpointError(
                f"checkpoint {path} was trained by another method than this config's: {'; '.join(errors)}. "
                "Pass the config the checkpoint was made with"
            )
        if differences:
            log.warning(
                "checkpoint %s was trained with %d other setting(s) than this config's, whose values are used: %s",
                path, len(differences), "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else ""),
            )


def check_shapes(checkpoint, model, path) -> None:
    """Refuse a checkpoint whose weights have other shapes than the model's (a base of another width),
    naming the checkpoint and the first weight, instead of torch's raw size-mismatch report."""
    stored = checkpoint.get("state_dict") or {}
    own = model.state_dict()
    for key, value in stored.items():
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
            differing = sum(1 for k, v in stored.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape))
            raise CheckpointError(
                f"checkpoint {path}: weight {key} has shape {tuple(value.shape)}, this model's {tuple(own[key].shape)} "
                f"({differing} weight(s) differ): it was trained on a base of another width than the config's"
            )


def derive_run_dirs(config) -> None:
    """Fill in the run directories a config leaves unset, under ``trainer.default_root_dir``.

    Logs go to ``<root>/logs`` (CSV), checkpoints to ``<root>/checkpoints``, the trained model to
    ``<root>/export``; so a method config names its run once. Anything a config sets is kept.
    """

    trainer = getattr(config, "trainer", None)
    root = getattr(trainer, "default_root_dir", None) if trainer is not None else None
    if not root:
        return
    if getattr(trainer, "logger", None) in (None, True):
        trainer.logger = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                   init_args=Namespace(save_dir=str(root), name="logs"))
    for callback in getattr(trainer, "callbacks", None) or []:
        args = getattr(callback, "init_args", None)
        if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and args is not None and not args.get("dirpath"):
            args["dirpath"] = f"{root}/checkpoints"
    model_args = getattr(getattr(config, "model", None), "init_args", None)
    if model_args is not None and "export_dir" in model_args and model_args.get("export_dir") is None:
        model_args["export_dir"] = f"{root}/export"


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point ``misp``: a ``UserError`` is printed as one line, exit status 2."""
    argv = list(sys.argv[1:] if args is None else args)
    logging.basicConfig(level=os.environ.get("MISP_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    try:
        check_config_files(argv)
        if argv and argv[0] in TOOLS:
            TOOLS[argv[0]][0](argv[1:])
            return
        cli = MispCLI(args=None if args is None else argv)
        if getattr(getattr(cli, "trainer", None), "received_sigterm", False):
            # SIGTERM after the loops' last check (during the export or teardown): still not a clean finish.
            raise SIGTERMException
    except SIGTERMException:
        print("misp: interrupted by SIGTERM: the run did not finish (resume it with --ckpt_path last)", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Interrupted as e:
        print(f"misp: {e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except UserError as e:
        if os.environ.get("MISP_TRACEBACK"):
            raise
        print(f"misp: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
