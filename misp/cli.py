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

What the Trainer subcommands add to LightningCLI, for reliability, is ``misp.lightning_cli.TrainingCLI``'s docstring.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.exceptions import SIGTERMException

from misp.config_build import instantiate_config
from misp.config_checks import check_config_files
from misp.errors import (
    ConfigError,
    Interrupted,
    UserError,
)
from misp.lightning_cli import TrainingCLI, check_shapes, derive_run_dirs  # noqa: F401 - re-exported
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


class MispCLI(TrainingCLI):
    """``TrainingCLI`` whose ``--help`` also lists the tool subcommands (``TOOLS``)."""

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Listed for --help only: main() runs tool subcommands before LightningCLI parses anything.
        action = parser._subcommands_action
        for name, (_, make_parser, help_text) in TOOLS.items():
            action.add_subcommand(name, make_parser(), help=help_text)


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
