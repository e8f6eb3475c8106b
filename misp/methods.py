"""Where the methods are: one YAML file each under ``configs/<world>/methods/``, and nowhere else.

A method file layers on its world's preference base (``configs/<world>/preference.yaml``) and names the
objective's terms and the negatives it needs. Everything that lists methods (the demo, ``misp
experiment``'s report, ``PreferenceObjective.preset``, the tests) asks this module, so a new method is
one new file. A file's first line may be ``# label: <text>``: its name in tables (the file's name
otherwise); an ablation file (``configs/experiments/ablations/``) may carry ``# label: <suffix>`` that a
variant built with it adds to its method's label.
"""

from __future__ import annotations

from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
"""The shipped configs folder (beside the package in a checkout or an editable install)."""
BASE_LABELS = {"sft": "base (SFT)", "base": "base (SFT)"}
"""Names of the runs that are no method (the SFT model every method starts from)."""


class UnknownMethod(ValueError):
    """A method name with no file under ``configs/*/methods/``."""


def method_files(configs: Path = CONFIGS) -> dict[str, Path]:
    """Every method by name (its file's stem): ``configs/*/methods/*.yaml``.

    Raises:
        ValueError: two worlds ship a method of the same name (the name would be ambiguous).
    """
    found: dict[str, Path] = {}
    for path in sorted(configs.glob("*/methods/*.yaml")):
        if path.stem in found:
            raise ValueError(f"method {path.stem!r} is defined twice: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


def method_file(name: str, configs: Path = CONFIGS) -> Path:
    """The file of method ``name``; ``UnknownMethod`` naming the known ones when there is none."""
    files = method_files(configs)
    if name not in files:
        raise UnknownMethod(f"unknown method {name!r}; the methods are {sorted(files)} (files in {configs}/*/methods/)")
    return files[name]


def method_config(name: str, configs: Path = CONFIGS) -> dict:
    """Method ``name``'s file as YAML data (what it adds to its world's preference base)."""
    return yaml.safe_load(method_file(name, configs).read_text()) or {}


def preference_base(name: str, configs: Path = CONFIGS) -> Path:
    """The preference base method ``name`` layers on: ``preference.yaml`` of its world's folder."""
    return method_file(name, configs).parent.parent / "preference.yaml"


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
