"""``TrainingCLI``: LightningCLI for misp's Trainer subcommands (fit, validate, test, predict).

``misp.cli.MispCLI`` adds the tool subcommands (``world``, ``prefs``, ``experiment``, ...) to its ``--help``;
code that parses a training command without running it (``misp experiment``'s check of every variant)
uses this class, so it does not import the tools, which import it back.

What ``TrainingCLI`` adds to LightningCLI, for reliability:

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
import sys
from collections.abc import Sequence

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import TrainerFn

from misp.callbacks import FiniteLossGuard, FiniteWeightsCheck, SettingsCheck, TrainsSomething
from misp.checkpoints import SPECIAL_PATHS, AtomicCheckpointIO, method_mismatches, read_checkpoint
from misp.config_checks import check_pairing, check_values
from misp.config_layers import check_method_home, merged_terms_args
from misp.errors import CheckpointError, ConfigError, innermost_reason, is_union_report

log = logging.getLogger("misp.cli")  # the name users see on its warnings, as before the split


class TrainingCLI(LightningCLI):
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
