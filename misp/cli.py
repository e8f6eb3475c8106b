"""The ``misp`` command: LightningCLI for every training stage, plus tool subcommands.

    misp fit --config configs/shapes/misp_dpo.yaml     any stage is `misp fit` with its config
    misp test --config ... --ckpt_path ...             POPE and CHAIR on the test split
    misp world --out DIR [--seed S] [...]              writes a Shapes world dataset to DIR
    misp prefs --config configs/shapes/clip_dpo_prefs.yaml   CLIP-DPO pairs sampled from a VLM

Tool subcommands (``world``, ``prefs``) are not Trainer methods, so ``main`` dispatches them to their own
jsonargparse parser before LightningCLI runs; ``misp --help`` still lists them beside fit/test.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

import lightning as L
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from misp.data.world import WorldConfig, write_world

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
    config = parser.instantiate_classes(cfg).world
    info = write_world(cfg.out, config, progress=not cfg.quiet)
    counts = ", ".join(f"{k} {v}" for k, v in info.get("counts", {}).items())
    print(f"wrote the Shapes world to {cfg.out}: {counts}")


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
    # `instantiate` replaced `instantiate_classes` in jsonargparse 4.49; misp supports older releases too.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(cfg)
    config = PrefsConfig(**{name: getattr(built, name) for name in PrefsConfig.__dataclass_fields__})
    summary = run_prefs(config)
    print(format_summary(summary))
    print(f"wrote {summary['pairs']} preference records to {config.output_file}")


TOOLS: dict[str, tuple[Callable[[Sequence[str]], None], Callable[[], ArgumentParser], str]] = {
    "world": (_run_world, _world_parser, "Write a seeded Shapes world dataset to a folder."),
    "prefs": (_run_prefs, _prefs_parser, "CLIP-DPO preference data from the VLM's own samples, ranked by CLIP."),
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
            parser_kwargs={"env_prefix": "MISP", "default_env": False},
            args=list(args) if args is not None else None,
            run=run,
        )

    def before_instantiate_classes(self) -> None:
        # The method (objective terms x negative source x K) is checked before any model or data loads.
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        check_configured_method(config)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Listed for --help only: main() runs tool subcommands before LightningCLI parses anything.
        action = parser._subcommands_action
        for name, (_, make_parser, help_text) in TOOLS.items():
            action.add_subcommand(name, make_parser(), help=help_text)


def check_configured_method(config) -> None:
    """``check_method`` on a parsed config whose model has an ``objective`` and whose data has a ``source``."""
    from misp.dpo.method import check_method
    from misp.dpo.objective import PreferenceObjective

    model = getattr(config, "model", None)
    data = getattr(config, "data", None)
    model_args = getattr(model, "init_args", None)
    data_args = getattr(data, "init_args", None)
    objective = getattr(model_args, "objective", None) if model_args is not None else None
    source = getattr(data_args, "source", None) if data_args is not None else None
    if objective is None or source is None or getattr(data_args, "mode", "dpo") != "dpo":
        return
    as_dict = objective.as_dict() if hasattr(objective, "as_dict") else vars(objective)
    check_method(PreferenceObjective.from_config(as_dict), source, int(getattr(data_args, "k", 0)))


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point ``misp``."""
    argv = list(sys.argv[1:] if args is None else args)
    logging.basicConfig(level=os.environ.get("MISP_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in TOOLS:
        TOOLS[argv[0]][0](argv[1:])
        return
    MispCLI(args=None if args is None else argv)


if __name__ == "__main__":
    main()
