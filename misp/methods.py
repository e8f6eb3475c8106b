"""Where the methods are: one YAML file each under ``configs/methods/``, and nowhere else.

A method file says the method and nothing else (``model.init_args.method``: beta, named terms, negative
source and K; ``misp.dpo.method.Method``); it layers on any preference base, a world's
(``configs/shapes/preference.yaml``) or a real model's (``configs/llava.yaml``, ``configs/qwen25vl.yaml``),
which hold the paths. A base that names no method runs ``DEFAULT_METHOD``. Everything that lists methods
(the demo, ``misp experiment``'s report, ``Method.preset``, the tests) asks this module, so a new method
is one new file. A file's first line may be ``# label: <text>``: its name in tables (the file's name
otherwise); an ablation file (``configs/experiments/ablations/``) may carry ``# label: <suffix>`` that a
variant built with it adds to its method's label.
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs folder (beside the package in a checkout or an editable install)."""
DEFAULT_METHOD = "misp_dpo"
"""The method a preference base runs when no method file is layered on it (the paper's)."""
BASE_LABELS = {"sft": "base (SFT)", "base": "base (SFT)"}
"""Names of the runs that are no method (the SFT model every method starts from)."""


class UnknownMethod(ValueError):
    """A method name with no file under ``configs/methods/``."""


def method_files(configs: Path = CONFIGS) -> dict[str, Path]:
    """Every method by name (its file's stem): ``configs/methods/*.yaml``."""
    return {path.stem: path for path in sorted((configs / "methods").glob("*.yaml"))}


def method_file(name: str, configs: Path = CONFIGS) -> Path:
    """The file of method ``name``; ``UnknownMethod`` naming the known ones when there is none."""
    files = method_files(configs)
    if name not in files:
        raise UnknownMethod(f"unknown method {name!r}; the methods are {sorted(files)} (files in {configs}/methods/)")
    return files[name]


def method_config(name: str, configs: Path = CONFIGS) -> dict:
    """Method ``name``'s file as YAML data (what it adds to a preference base)."""
    return yaml.safe_load(method_file(name, configs).read_text()) or {}


def run_configs(name: str, world: Path) -> list[Path]:
    """The ``--config`` files of method ``name`` on a world: the world's ``preference.yaml``, the method's
    file, and the world's side of that method if it has one (``<world>/<name>_data.yaml``: data the method
    needs there, e.g. CLIP-DPO's generated pairs). The world is a config folder (``configs/shapes``); its
    ``methods`` are those of ``configs/methods`` beside it."""
    files = [world / "preference.yaml", method_file(name, world.parent)]
    own = world / f"{name}_data.yaml"
    return files + ([own] if own.is_file() else [])


def is_method_file(path: Path, configs: Path = CONFIGS) -> bool:
    """Whether ``path`` is one of the shipped method files."""
    return Path(path).resolve() in {p.resolve() for p in method_files(configs).values()}


def file_label(path: Path) -> str | None:
    """The ``# label: ...`` of a config file's first line, or None."""
    first = path.read_text().split("\n", 1)[0].strip()
    return first.split(":", 1)[1].strip() if first.startswith("# label:") else None


def labels(configs: Path = CONFIGS) -> dict[str, str]:
    """Every method's label by name, plus the base model's."""
    return BASE_LABELS | {name: file_label(path) or name for name, path in method_files(configs).items()}


def variant_label(name: str, method: str, extra: list[str], known: dict[str, str], root: Path = Path(".")) -> str:
    """A variant's label: its method's when it is the method itself, or followed by the label suffixes of
    its extra files (``misp_anchor``: "MISP-DPO + anchor"); else its own name (``misp_k1``)."""
    suffixes = [label for file in extra if (path := root / file).exists() and (label := file_label(path))]
    if name == method or suffixes:
        return " ".join([known.get(method, method), *suffixes])
    return known.get(name, name)
