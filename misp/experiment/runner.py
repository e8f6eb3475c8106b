"""``misp experiment``: every method over seeds, tuned on the validation split, from one shared chain.

Order of work (each step resumable; a finished step is never redone):

1. the chain, once: world -> CLIP -> SFT (the base every method starts from) -> SAE, and the base model's
   validation and test results; then the data of any method that makes its own (``<name>_prefs.yaml``,
   CLIP-DPO; ``<name>_sae.yaml``, the mixed pools), which reads the shared chain but not another method's;
2. tuning: each method's grid on the first seed, each point judged by ``misp validate`` on the
   validation split;
3. the chosen point of each method on every seed, and each ablation with its method's chosen point on
   every seed, each judged by ``misp test`` on the test split;
4. the report (``misp.experiment.report``).

Every stage is a ``misp`` command run in the experiment's workspace (``misp.pipeline``), the same command
a user would type. A run whose fit died resumes from its last checkpoint. A changed config, data file,
grid value or chain output makes exactly the affected runs run again: a run's fingerprint holds the stamps of
the chain stages it reads, so adding a method with data of its own reruns none of the others.

What is recorded is only what finished: a fit counts once it wrote ``fit_done.json`` (``misp fit`` writes
it when training reached its end, never when interrupted or failed), and a run's row is written after its
evaluation. Before the chain runs, every run's command line is parsed as ``misp fit`` would parse it (a
grid key no method accepts is an error naming the variant and the key), and the workspace is locked
(``misp.utils.lock``): a second experiment on it is refused, naming the first.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from misp.callbacks import FIT_DONE
from misp.demo import own_data_stages
from misp.errors import ConfigError, UserError
from misp.experiment.config import ExperimentConfig, Variant
from misp.experiment.results import ResultsLog, training_curve_summary
from misp.methods import run_configs
from misp.pipeline import Stage, StageRunner, fingerprint
from misp.utils.io import atomic_write_json
from misp.utils.lock import FolderLock

RUNS = Path("runs/shapes/exp")
"""Where the preference runs go, inside the workspace (beside the chain's ``runs/shapes/<stage>``)."""
STAMPS = Path(".stamps")


def cli_value(value: Any) -> str:
    """A config value as the command line spells it (``true``, ``null``, ``[1, 2]``, ``5e-05``)."""
    return value if isinstance(value, str) else json.dumps(value)


def short_key(key: str) -> str:
    """``model.init_args.method.beta`` -> ``beta``: the name a grid value goes by in run ids and tables."""
    return key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Run:
    """One preference training run: a variant, its grid values and a seed."""

    variant: Variant
    values: tuple[tuple[str, Any], ...]
    seed: int
    phase: str
    """``tune`` (a grid point, judged on validation) or ``final`` (a chosen point or an ablation, on test)."""

    @property
    def id(self) -> str:
        slug = "_".join(f"{short_key(k)}{v}" for k, v in self.values)
        return f"{self.variant.name}/{slug}-s{self.seed}"

    @property
    def dir(self) -> Path:
        return RUNS / self.id


_REPORT_PREFIXES = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value", "Problem with given",
                    "Expected a <class 'NoneType'>", "- Expected a <class 'NoneType'>", "Not a valid subclass")


def parse_reason(message: str) -> str:
    """The line of a jsonargparse parse error that says what is wrong (``Option 'kk' is not accepted``)."""
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        if text and not text.startswith(_REPORT_PREFIXES):
            return text
    return message.strip().splitlines()[0] if message.strip() else message


def _hash_stamps(stamps: list[str]) -> str:
    return hashlib.sha256("\n".join(stamps).encode()).hexdigest()


def world_file_flag(path: Path) -> str:
    """How ``misp world`` takes ``path``: ``--world`` for a flat YAML of WorldConfig fields (what
    ``ExperimentConfig.world`` documents), ``--config`` for one nesting them under ``world:``."""
    import yaml

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"experiment world file {path}: not a readable YAML file ({e})".splitlines()[0]) from None
    return "--config" if isinstance(content, dict) and isinstance(content.get("world"), dict) else "--world"


class _Parsed(Exception):
    """Raised by :func:`check_fit_command` once the command parsed (nothing is built)."""


_ACCEPTED: set[str] = set()
"""Commands (with their config files' contents) this process has parsed already: an experiment resumed
or rerun in one process parses each once."""


def check_fit_command(args: list[str]) -> None:
    """Parse ``misp <args>`` as the ``misp`` command would, and run its config checks, building nothing.

    Raises:
        ConfigError: the command's options are refused; the message is jsonargparse's reason.
    """
    key = fingerprint(Stage("check", list(args), Path("-")))
    if key in _ACCEPTED:
        return
    _check_fit_command(args)
    _ACCEPTED.add(key)


def _check_fit_command(args: list[str]) -> None:
    from jsonargparse import ArgumentError

    from misp.lightning_cli import TrainingCLI

    class ParseOnly(TrainingCLI):
        def init_parser(self, **kwargs):
            return super().init_parser(**kwargs, exit_on_error=False)

        def _set_seed(self) -> None:
            pass  # parsing only: the global RNGs of this process are left alone

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            # Nothing is instantiated here but the method: its construction is its check (misp.dpo.method).
            method = self.config[self.subcommand].get("model.init_args.method")
            if method is not None:
                from misp.dpo.method import build_method

                build_method(method.as_dict() if hasattr(method, "as_dict") else method)
            raise _Parsed

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
            ParseOnly(args=args)
    except _Parsed:
        return
    except ArgumentError as e:
        raise ConfigError(parse_reason(str(e))) from None


class Experiment:
    """Plans and runs an ``ExperimentConfig`` (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, repo: Path = Path("."), command: str = "", quick: bool = False) -> None:
        """``config`` as ``resolved()`` or ``quick_version()`` made it; ``quick`` also shrinks the chain."""
        config.validate()
        self.config = config
        self._quick = config.quick_mode if quick else None
        self.repo = repo.resolve()
        self.command = command
        self.workspace = (self.repo / config.workspace).resolve()
        self.configs = (self.repo / config.configs).resolve()
        self.results = ResultsLog(self.workspace / "results.jsonl")
        self.runner = StageRunner(stamps=STAMPS, cwd=self.workspace, label="experiment")
        self.chain_hash = ""
        self.chain_hashes: dict[str, str] = {}
        self._check_files()

    # configuration ----------------------------------------------------------------------------------
    def _check_files(self) -> None:
        """Every config file the experiment names exists: an error now, not after an hour of runs."""
        needed = [self.configs / f"{name}.yaml" for name in ("clip", "sft", "sae", "preference")]
        for v in self.config.methods + self.config.ablations:
            needed.append(self.method_file(v))
        needed += [self.repo / extra for v in self.config.methods + self.config.ablations for extra in v.extra]
        if self.config.world:
            needed.append(self.repo / self.config.world)
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise ConfigError(f"experiment {self.config.name!r}: config file(s) not found: {missing}")

    def method_file(self, variant: Variant) -> Path:
        """The variant's method file (``misp.methods``: ``configs/methods`` beside the world's folder)."""
        return self.configs.parent / "methods" / f"{variant.method}.yaml"

    def variant(self, name: str) -> Variant:
        return next(v for v in self.config.methods + self.config.ablations if v.name == name)

    def grid_points(self) -> list[tuple[tuple[str, Any], ...]]:
        keys = list(self.config.grid)
        return [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*self.config.grid.values())]

    def check_commands(self) -> None:
        """Parse every variant's ``misp fit`` command before anything runs: each variant on as many grid
        points as its longest value list has values (together they hold every grid value), so a grid key or
        value, a ``set`` key or an ``extra`` file that the method refuses is an error now, not after the chain.
        """
        keys = list(self.config.grid)
        width = max(len(v) for v in self.config.grid.values())
        points = [tuple((k, self.config.grid[k][i % len(self.config.grid[k])]) for k in keys) for i in range(width)]
        for variant in self.config.methods + self.config.ablations:
            for point in points:
                run = Run(variant, point, self.config.seeds[0], "tune")
                try:
                    check_fit_command(["fit", *self.run_args(run, run.dir)])
                except UserError as e:
                    shown = ", ".join(f"{k}={v!r}" for k, v in point)
                    raise ConfigError(f"experiment {self.config.name!r}: variant {variant.name!r} (method "
                                      f"{variant.method!r}) at grid point {shown}: `misp fit` refuses it: {e}") from None

    # the chain -----------------------------------------------------------------------------------------
    def _quick_flags(self, stage: str) -> list[str]:
        epochs = self._quick.chain_epochs.get(stage) if self._quick else None
        return ["--trainer.max_epochs", str(epochs)] if epochs else []

    def chain(self) -> list[Stage]:
        """The shared stages every run reads (world, CLIP, SFT and its evaluations, the SAE), then each method's
        own (``own_stages``)."""
        world = ["world", "--out", "worlds/shapes", "--quiet", "true"]
        if self.config.world:
            world += [world_file_flag(self.repo / self.config.world), str(self.repo / self.config.world)]
        if self._quick:
            world += [f"--{k}={v}" for k, v in self._quick.world.items()]
        sft = ["--config", str(self.configs / "sft.yaml")]
        sft_ckpt = "runs/shapes/sft/checkpoints/last.ckpt"
        return [
            Stage("world", world, Path("worlds/shapes/world.json")),
            Stage("clip", ["fit", "--config", str(self.configs / "clip.yaml"), *self._quick_flags("clip")],
                  Path("runs/shapes/clip/export")),
            Stage("sft", ["fit", *sft, *self._quick_flags("sft")], Path("runs/shapes/sft/export")),
            Stage("sft-val", ["validate", *sft, "--ckpt_path", sft_ckpt, "--data.init_args.val_limit", "null"],
                  Path("runs/shapes/sft/validation_results.json")),
            Stage("sft-test", ["test", *sft, "--ckpt_path", sft_ckpt], Path("runs/shapes/sft/test_results.json")),
            Stage("sae", ["fit", "--config", str(self.configs / "sae.yaml"), *self._quick_flags("sae")],
                  Path("runs/shapes/sae/export/sae.json")),
        ]

    def own_stages(self) -> dict[str, list[Stage]]:
        """Each method's own data, made once for every seed and grid point: its pairs (CLIP-DPO) or its SAE
        (the mixed pools). They read the shared chain but not each other."""
        stages = {}
        for method in sorted({v.method for v in self.config.methods + self.config.ablations}):
            stages[method] = own_data_stages(method, self.configs)
            for stage in stages[method]:
                if stage.args[0] == "fit":
                    stage.args += self._quick_flags("sae")
        return stages

    def _stamp(self, stage: Stage) -> str:
        stamp = self.runner.stamp_path(stage)
        return f"{stage.name}:{stamp.read_text().strip()}:{stamp.stat().st_mtime_ns}"

    def run_chain(self) -> None:
        force = False
        shared = []
        self.check_select_metric()  # a workspace whose base model was validated already: before anything
        for stage in self.chain():
            # A stage that ran changed what every later one reads, so none of their outputs may be reused.
            force = self.runner.run(stage, force) or force
            if stage.name == "sft-val":
                self.check_select_metric()  # the first validation results: before the rest of the chain
            shared.append(self._stamp(stage))
        # A run's fingerprint holds the stamps of the stages it reads: a rerun shared stage (a new base model)
        # reruns every run, a method's rerun SAE only that method's runs, and a method added to the
        # experiment (with stages of its own) none of the others'.
        self.chain_hash = _hash_stamps(shared)
        self.chain_hashes = {}
        for method, stages in self.own_stages().items():
            own, ran = [], force
            for stage in stages:
                ran = self.runner.run(stage, ran) or ran
                own.append(self._stamp(stage))
            self.chain_hashes[method] = _hash_stamps(shared + own) if own else self.chain_hash
        for split, name in (("val", "validation_results.json"), ("test", "test_results.json")):
            metrics = json.loads((self.workspace / "runs/shapes/sft" / name).read_text())
            self.results.put({"run": "base", "variant": "base", "method": "sft", "phase": "base", "seed": None,
                              "values": {}, "split": split, "metrics": metrics, "fingerprint": self.chain_hash})

    # preference runs -----------------------------------------------------------------------------------
    def run_args(self, run: Run, root: Path) -> list[str]:
        v = run.variant
        args = [a for path in run_configs(v.method, self.configs) for a in ("--config", str(path))]
        for extra in v.extra:
            args += ["--config", str(self.repo / extra)]
        args += ["--seed_everything", str(run.seed), "--data.init_args.seed", str(run.seed),
                 "--trainer.max_epochs", str(self.config.max_epochs), "--trainer.default_root_dir", str(root),
                 "--model.init_args.export_dir", ""]  # evaluated from its checkpoint; no export needed
        for key, value in sorted(self.config.set.items()) + list(run.values) + sorted(v.set.items()):
            args += [f"--{key}", cli_value(value)]
        return args

    def _logger_args(self, run: Run, root: Path, job: str) -> list[str]:
        """W&B beside the CSV logger, when asked: runs grouped by experiment, named by run and job, with
        variant, seed and grid values in the run's config beside the hyperparameters Lightning logs. The CSV
        logs stay, since the report's training diagnostics are read from them."""
        if not self.config.wandb:
            return []
        config = {"experiment": self.config.name, "variant": run.variant.name, "method": run.variant.method,
                  "seed": run.seed, "phase": run.phase, **{short_key(k): v for k, v in run.values}}
        loggers = [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root), "name": "logs"}},
            {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"save_dir": str(root), "project": self.config.wandb_project, "name": f"{run.id}:{job}"},
             # WandbLogger hands its **kwargs to wandb.init
             "dict_kwargs": {"group": self.config.name, "job_type": job, "config": config}},
        ]
        return ["--trainer.logger", json.dumps(loggers)]

    def stages(self, run: Run) -> tuple[Stage, Stage]:
        """The run's fit and its evaluation (``validate`` for a tuning run, ``test`` otherwise)."""
        # A new base model (or the method's own SAE or pairs) makes the fit stale, not only its row.
        fit = Stage(f"{run.id}/fit", ["fit", *self.run_args(run, run.dir), *self._logger_args(run, run.dir, "fit")],
                    run.dir / FIT_DONE, resume_from=run.dir / "checkpoints/last.ckpt",
                    reads=self.chain_read_by(run))
        split = "val" if run.phase == "tune" else "test"
        root = run.dir / split
        sub, out = ("validate", "validation_results.json") if split == "val" else ("test", "test_results.json")
        extra = ["--data.init_args.val_limit", "null"] if split == "val" else []
        evaluate = Stage(f"{run.id}/{split}",
                         [sub, *self.run_args(run, root), "--ckpt_path", str(run.dir / "checkpoints/last.ckpt"), *extra,
                          *self._logger_args(run, root, split)],
                         root / out)
        return fit, evaluate

    def chain_read_by(self, run: Run) -> str:
        """The hash of the chain stages ``run`` reads: the shared ones and its method's own."""
        return self.chain_hashes.get(run.variant.method, self.chain_hash)

    def run_fingerprint(self, run: Run, fit: Stage, evaluate: Stage) -> str:
        """One hash of a run's fit and evaluation commands, their configs' contents and the chain stages it reads."""
        payload = [fingerprint(fit, self.workspace), fingerprint(evaluate, self.workspace), self.chain_read_by(run)]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()

    def run(self, run: Run, position: str) -> dict:
        """Fit and evaluate ``run`` unless results.jsonl already holds it; its row."""
        split = "val" if run.phase == "tune" else "test"
        fit, evaluate = self.stages(run)
        fp = self.run_fingerprint(run, fit, evaluate)
        if (row := self.results.find(run.id, split, fp)) is not None:
            return row
        print(f"[experiment] {position} {run.id} ({run.phase}, {split})", flush=True)
        start = time.perf_counter()
        if not self.runner.is_done(fit) and not self.runner.can_resume(fit):
            # A fresh start: no logs or checkpoints of an attempt with other settings may mix into this one.
            shutil.rmtree(self.workspace / run.dir, ignore_errors=True)
        self.runner.run(fit)
        fit_done = self.workspace / fit.done_when
        if not fit_done.is_file():
            raise UserError(f"run {run.id}: `misp fit` exited without writing {fit_done}, so its training did not "
                            "reach its end; nothing of it is recorded")
        fit_s = time.perf_counter() - start
        self.runner.run(evaluate, force=True)
        row = {
            "run": run.id, "variant": run.variant.name, "method": run.variant.method, "phase": run.phase,
            "seed": run.seed, "values": {short_key(k): v for k, v in run.values}, "split": split,
            "metrics": json.loads((self.workspace / evaluate.done_when).read_text()),
            "training": training_curve_summary(self.workspace / run.dir / "logs"),
            "fit": json.loads(fit_done.read_text()),
            "fit_s": round(fit_s, 1), "eval_s": round(time.perf_counter() - start - fit_s, 1),
            "command": "misp " + " ".join(fit.args), "fingerprint": fp,
        }
        self.results.put(row)
        return row

    def _prune(self, run: Run) -> None:
        if not self.config.keep_checkpoints:
            shutil.rmtree(self.workspace / run.dir / "checkpoints", ignore_errors=True)

    def check_select_metric(self) -> None:
        """Refuse a ``select_metric`` the validation results do not hold, once the base model's exist.

        Which metrics a validation reports depends on its data (POPE subsets, CHAIR, grounding), so the
        names are taken from the base model's validation, the chain's first, before any tuning run.
        """
        path = self.workspace / "runs/shapes/sft/validation_results.json"
        if not path.is_file():
            return
        metrics = sorted(json.loads(path.read_text()))
        if self.config.select_metric not in metrics:
            raise ConfigError(f"experiment {self.config.name!r}: select_metric {self.config.select_metric!r} is not "
                              f"a validation metric; the validation reports {metrics}")

    def choose(self, variant: Variant, rows: list[dict]) -> tuple[tuple[str, Any], ...]:
        """The grid point whose validation ``select_metric`` is best (ties: the first in grid order)."""
        metric, sign = self.config.select_metric, 1 if self.config.select_mode == "max" else -1
        missing = [r["run"] for r in rows if metric not in r["metrics"]]
        if missing:
            raise ConfigError(f"select_metric {metric!r} is not among the validation results of {missing[0]} "
                              f"(it has {sorted(rows[0]['metrics'])[:12]}...)")
        best = max(range(len(rows)), key=lambda i: (sign * rows[i]["metrics"][metric], -i))
        return self.grid_points()[best]

    # everything ---------------------------------------------------------------------------------------
    def plan_finals(self, chosen: dict[str, tuple]) -> list[Run]:
        runs = [Run(v, chosen[v.name], s, "final") for v in self.config.methods for s in self.config.seeds]
        runs += [Run(v, chosen[v.like or self.config.main], s, "final") for v in self.config.ablations
                 for s in self.config.seeds]
        return runs

    def _previous_timing(self) -> dict:
        path = self.workspace / "summary.json"
        return json.loads(path.read_text()).get("timing", {}) if path.exists() else {}

    def execute(self) -> dict:
        """Run everything not done yet (see the module docstring), holding the workspace's lock."""
        self.check_commands()
        self.workspace.mkdir(parents=True, exist_ok=True)
        with FolderLock(self.workspace, self.command or f"misp experiment {self.config.name}"):
            return self._execute()

    def _execute(self) -> dict:
        start = time.perf_counter()
        atomic_write_json(self.workspace / "experiment.json", {"command": self.command, "config": asdict(self.config)})
        self.run_chain()
        chain_s = time.perf_counter() - start
        points = self.grid_points()
        n_total = len(self.config.methods) * len(points) + len(self.plan_finals(
            {v.name: points[0] for v in self.config.methods}))
        done = 0
        chosen = {}
        for variant in self.config.methods:
            tuning = [Run(variant, p, self.config.seeds[0], "tune") for p in points]
            rows = []
            for run in tuning:
                done += 1
                rows.append(self.run(run, f"[{done}/{n_total}]"))
            chosen[variant.name] = self.choose(variant, rows)
            for run in tuning:
                if run.values != chosen[variant.name]:
                    self._prune(run)
        for run in self.plan_finals(chosen):
            done += 1
            self.run(run, f"[{done}/{n_total}]")
            self._prune(run)
        # Summed over every call that built this workspace: a resumed experiment reports all the time it took.
        before = self._previous_timing()
        timing = {"total_s": round(before.get("total_s", 0.0) + time.perf_counter() - start, 1),
                  "chain_s": round(before.get("chain_s", 0.0) + chain_s, 1), "calls": before.get("calls", 0) + 1}
        summary = {"chosen": {k: {short_key(a): b for a, b in v} for k, v in chosen.items()}, "timing": timing,
                   "command": self.command, "config": asdict(self.config)}
        atomic_write_json(self.workspace / "summary.json", summary)
        return summary
