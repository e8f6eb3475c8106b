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
from misp.experiment.config import ExperimentConfig, QuickMode, Variant
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


PRESENTATION = ("metrics", "report")
"""ExperimentConfig fields that change only how results are shown: ``--report_only`` takes them from the
current config; every other field from the config the results were made with."""


def config_of_results(current: ExperimentConfig, summary: dict) -> ExperimentConfig:
    """The config the workspace's results were made with (``summary.json``), with the current config's
    presentation fields; a warning lists the fields the current config changed since (ignored: the report
    must describe what the rows hold, so rerun without ``--report_only`` to apply them)."""
    import dataclasses

    stored = summary.get("config")
    if not stored:
        return current  # a workspace from before summaries held their config
    fields = set(ExperimentConfig.__dataclass_fields__)
    values = {k: v for k, v in stored.items() if k in fields}
    for key in ("methods", "ablations"):
        values[key] = [Variant(**v) for v in values.get(key, [])]
    if "quick_mode" in values:
        values["quick_mode"] = QuickMode(**values["quick_mode"])
    made_with = ExperimentConfig(**values)
    now, then = asdict(current), asdict(made_with)
    changed = sorted(k for k in fields if k not in PRESENTATION and now[k] != then[k])
    if changed:
        print(f"[experiment] --report_only: the config changed {changed} since these results were made; the report "
              "describes the results as they were made (rerun without --report_only to apply the changes)",
              file=sys.stderr)
    return dataclasses.replace(made_with, **{k: getattr(current, k) for k in PRESENTATION})


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
        config = config_of_results(config, summary)
    else:
        summary = experiment.execute()
    known = labels(Path(config.configs).parent)
    names = {v.name: variant_label(v.name, v.method, list(v.extra), known) for v in [*config.methods, *config.ablations]}
    report = write_report(experiment.workspace, Path(config.report), asdict(config), summary, command, known | names)
    print(f"[experiment] report: {report} (figure {report.with_suffix('.png')}, raw rows "
          f"{report.with_suffix('.jsonl')})", file=sys.stderr)
