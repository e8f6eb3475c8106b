"""The ``misp experiment`` command line: an ``ExperimentConfig`` from YAML, plus ``--quick`` and
``--report_only``."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from misp.config_build import instantiate_config
from misp.errors import UserError
from misp.experiment.config import ExperimentConfig
from misp.experiment.report import write_report
from misp.experiment.runner import Experiment
from misp.methods import labels, variant_label


def experiment_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="misp experiment",
        description="Every preference method over seeds from one shared chain, each tuned on the validation "
        "split; writes results.jsonl and a report (e.g. misp experiment --config configs/experiments/shapes.yaml).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with ExperimentConfig fields.")
    parser.add_class_arguments(ExperimentConfig, None)
    parser.add_argument("--quick", type=bool, default=False,
                        help="Smoke run in a few minutes: the `quick` settings (small world, one seed), its own workspace.")
    parser.add_argument("--report_only", type=bool, default=False,
                        help="Only remake the report from the workspace's results.jsonl.")
    return parser


def run_experiment(argv: Sequence[str]) -> None:
    parser = experiment_parser()
    cfg = parser.parse_args(list(argv))
    built = instantiate_config(parser, cfg)
    config = ExperimentConfig(**{name: getattr(built, name) for name in ExperimentConfig.__dataclass_fields__})
    config = config.quick_version() if cfg.quick else config.resolved()
    command = "misp experiment " + shlex.join(argv)
    experiment = Experiment(config, Path("."), command, quick=cfg.quick)
    if cfg.report_only:
        summary_file = experiment.workspace / "summary.json"
        if not summary_file.exists():
            raise UserError(f"--report_only: no finished experiment in {experiment.workspace} ({summary_file} missing)")
        summary = json.loads(summary_file.read_text())
        command = summary.get("command", command)
    else:
        summary = experiment.execute()
    known = labels(Path(config.configs).parent)
    names = {v.name: variant_label(v.name, v.method, list(v.extra), known) for v in [*config.methods, *config.ablations]}
    report = write_report(experiment.workspace, Path(config.report), asdict(config), summary, command, known | names)
    print(f"[experiment] report: {report} (figure {report.with_suffix('.png')}, raw rows "
          f"{report.with_suffix('.jsonl')})", file=sys.stderr)
