"""What ``misp experiment`` runs, as dataclasses a YAML file fills (``configs/experiments/shapes.yaml``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from misp.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")
"""A variant or method name: one plain path component (a run's folder, a config file's stem)."""

BETA = "model.init_args.method.beta"
LR = "model.init_args.lr"


@dataclass
class Variant:
    """One row of the results: a method config, maybe with some settings changed."""

    name: str
    """Its name in the results (``misp_k1``); also its folder under the experiment's runs."""
    method: str
    """A method file in ``configs/methods`` (``misp.methods``) by file stem (``misp_dpo``)."""
    set: dict[str, Any] = field(default_factory=dict)
    """Settings changed from the method config, as command-line keys (``model.init_args.method.negatives.k: 1``)."""
    extra: list[str] = field(default_factory=list)
    """Config files layered after the method config (relative to where misp runs), for changes the
    command line cannot say, such as terms changed, added or dropped (``configs/experiments/ablations``)."""
    like: str | None = None
    """Ablations only: the tuned method whose chosen grid values this variant trains with (default: the
    experiment's ``main`` method), so an ablation changes one thing and nothing else."""


@dataclass
class QuickMode:
    """What ``--quick`` shrinks: a smoke run of the whole experiment in a few minutes (numbers mean nothing)."""

    world: dict[str, int] = field(default_factory=lambda: dict(
        n_clip=1280, n_sft=160, n_pref=48, n_pool=120, n_test=24, n_val=24, test_counterfactuals=8,
        val_counterfactuals=8,
    ))
    """World settings replaced (smaller splits)."""
    chain_epochs: dict[str, int] = field(default_factory=lambda: {"clip": 4, "sft": 2, "sae": 1})
    """Epochs of the shared stages (CLIP, SFT, SAE). The CLIP needs past its 30 warm-up steps (4 epochs of
    8 batches): an untrained one embeds every image alike, and mining then finds no negative."""
    max_epochs: int = 1
    """Epochs of every preference run."""
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, list] = field(default_factory=lambda: {BETA: [0.1, 0.5], LR: [1.0e-4]})
    ablations: int | None = 2
    """Keep only the first N ablations (None: all)."""


@dataclass
class ExperimentConfig:
    """A fair comparison of preference methods: one shared chain, then every method on every seed.

    The chain (world, CLIP, SFT, SAE and any method's own data) runs once. Each method's grid is searched
    on seed ``seeds[0]`` and judged on the **validation** split by ``select_metric``; the chosen values
    then train on every seed and are evaluated on the test split, which nothing is chosen by. Ablations
    reuse their tuned method's chosen values. Every run has the same budget (``max_epochs``, the shared
    preference config's batch size and records).
    """

    name: str = "shapes"
    """Names the experiment in the report and groups its runs in W&B."""
    workspace: str | None = None
    """Folder every stage runs in (default ``runs/experiments/<name>``, with ``-<world file stem>`` for
    another world): the shipped configs' relative paths (``worlds/shapes``,
    ``runs/shapes/...``, ``cache/shapes``) land inside it, so experiments never touch each other or the
    demo. Holds ``results.jsonl`` (one row per evaluated run)."""
    configs: str = "configs/shapes"
    """The world's config folder: the chain (``clip.yaml``, ``sft.yaml``, ``sae.yaml``), the preference base
    (``preference.yaml``) and a method's side of the world (``<method>_data.yaml``, ``<method>_sae.yaml``,
    ``<method>_prefs.yaml``); the methods are the files of ``methods/`` beside it (``misp.methods``)."""
    world: str | None = None
    """A YAML of WorldConfig fields at its top level, as ``misp world --world`` takes it (a file nesting them
    under ``world:``, as ``misp world --config`` takes it, works too); None: the default world."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the preference runs (the chain is shared; its seeds are the configs')."""
    max_epochs: int = 2
    """Epochs of every preference run: the same training budget for every method."""
    grid: dict[str, list] = field(default_factory=lambda: {BETA: [0.1, 0.5], LR: [5.0e-5, 1.0e-4]})
    """Values searched per method, as command-line keys; every combination is one tuning run."""
    set: dict[str, Any] = field(default_factory=dict)
    """Settings changed in every preference run, as command-line keys (e.g. the gradient diagnostics)."""
    select_metric: str = "chair/object_f1"
    """The validation metric a method's grid point is chosen by."""
    select_mode: Literal["max", "min"] = "max"
    methods: list[Variant] = field(default_factory=list)
    """Tuned methods (baselines and the main method)."""
    main: str = "misp_dpo"
    """The method the report compares with every other, and ablations take their values from."""
    ablations: list[Variant] = field(default_factory=list)
    """Variants trained on every seed with their ``like`` method's chosen values (no grid of their own)."""
    metrics: list[str] = field(default_factory=list)
    """Test metrics in the report's tables, in order (all are kept in results.jsonl)."""
    report: str | None = None
    """Where the report goes (relative to where misp runs); the figure and a copy of results.jsonl go
    beside it. Default ``docs/results-<world file stem>.md``, or ``docs/results-default.md`` for the default
    world (``docs/results.md`` is the hand-written reading of the reports, which no run overwrites)."""
    wandb: bool = False
    """Log every fit to W&B, grouped by ``name``, with variant, seed and grid values in the run config."""
    wandb_project: str = "misp"
    keep_checkpoints: bool = False
    """Keep each run's checkpoints after its evaluation (they are deleted to save disk otherwise)."""
    quick_mode: QuickMode = field(default_factory=QuickMode)
    """What `--quick true` changes."""

    def resolved(self) -> ExperimentConfig:
        """This config with its derived defaults (workspace, report) filled in."""
        suffix = f"-{Path(self.world).stem}" if self.world else "-default"
        return replace(
            self,
            workspace=self.workspace or f"runs/experiments/{self.name}{suffix}",
            report=self.report or f"docs/results{suffix}.md",
        )

    def validate(self) -> None:
        """Raise a ConfigError naming the first contradiction or unusable name (before anything runs)."""
        for v in self.methods + self.ablations:
            for what, value in (("name", v.name), ("method", v.method)):
                if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
                    raise ConfigError(f"experiment {self.name!r}: variant {what} {value!r} is not a plain name (letters, "
                                      "digits and _ . + = -, no '..' or '/'): it names a folder inside the workspace")
        for key, values in self.grid.items():
            for value in values or []:
                if any(c in str(value) for c in "/\\\0"):
                    raise ConfigError(f"experiment {self.name!r}: grid {key}: value {value!r} cannot be part of a run's "
                                      "folder name (it holds a path separator)")
        names = [v.name for v in self.methods + self.ablations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"experiment {self.name!r}: variant names must be unique, repeated: {duplicates}")
        tuned = {v.name for v in self.methods}
        if self.main not in tuned:
            raise ConfigError(f"experiment {self.name!r}: main method {self.main!r} is not among methods {sorted(tuned)}")
        for v in self.ablations:
            if (v.like or self.main) not in tuned:
                raise ConfigError(f"ablation {v.name!r}: like={v.like!r} is not a tuned method ({sorted(tuned)})")
        for v in self.methods:
            if v.like is not None:
                raise ConfigError(f"method {v.name!r}: `like` is for ablations; a method is tuned on its own grid")
        if not self.seeds:
            raise ConfigError("experiment: seeds must not be empty")
        if not self.grid or any(not values for values in self.grid.values()):
            raise ConfigError(f"experiment: every grid key needs at least one value, got {self.grid}")
        if self.max_epochs < 1:
            raise ConfigError(f"experiment: max_epochs must be >= 1, got {self.max_epochs}")

    def quick_version(self) -> ExperimentConfig:
        """This experiment shrunk by ``quick_mode``: its own workspace and report, a small world, one seed."""
        q, self = self.quick_mode, self.resolved()
        ablations = self.ablations if q.ablations is None else self.ablations[: q.ablations]
        return replace(
            self, workspace=f"{self.workspace}-quick", report=f"{self.workspace}-quick/results.md",
            seeds=list(q.seeds), max_epochs=q.max_epochs, grid=dict(q.grid), ablations=ablations,
        )
