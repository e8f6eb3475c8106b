"""Layered ``--config`` files merge a method's terms key by key, so an overlay changes one term.

jsonargparse merges nested namespaces across ``--config`` files field by field, but replaces a dict-typed
value (``model.init_args.method.terms``) wholesale: an ablation that sets ``text: {init_args: {weight:
0.25}}`` would drop every other term. ``merged_terms_args`` reads the files' term maps in order and merges
them key by key (a term's ``init_args`` field by field while its class stays; ``null`` drops the term; a
new key is appended, so the terms keep the order they are summed in), then hands jsonargparse the merged
map right after the last file that named terms, so later command-line options still override it.

Layering two method files (``configs/methods/``) is refused: their terms would silently mix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from misp.errors import ConfigError

TERMS_KEY = "model.init_args.method.terms"
"""Where a config names its method's terms."""


def _config_positions(argv: Sequence[str]) -> list[tuple[int, Path]]:
    """``(index of the last token, path)`` of every ``--config`` file in ``argv``."""
    found = []
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            found.append((i + 1, Path(argv[i + 1])))
        elif token.startswith("--config="):
            found.append((i, Path(token.split("=", 1)[1])))
    return found


def _terms_of(path: Path) -> dict | None:
    if not path.is_file():
        return None  # inline YAML, or a missing file jsonargparse reports itself
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    node = data
    for key in TERMS_KEY.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    if not isinstance(node, dict):
        raise ConfigError(f"--config {path}: {TERMS_KEY} must be a mapping of term name -> term, got {type(node).__name__}")
    return node


def _same_class(a: str | None, b: str | None) -> bool:
    # Short names (TextDPO) and full ones (misp.dpo.terms.TextDPO) name the same class.
    return b is None or (a is not None and a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1])


def merge_terms(maps: list[dict]) -> dict:
    """The term maps of layered files merged key by key (see the module docstring)."""
    merged: dict = {}
    for terms in maps:
        for key, spec in terms.items():
            if spec is None:
                merged.pop(key, None)
                continue
            spec = dict(spec)
            prev = merged.get(key)
            if prev is not None and _same_class(prev.get("class_path"), spec.get("class_path")):
                init_args = {**(prev.get("init_args") or {}), **(spec.get("init_args") or {})}
                spec = {"class_path": prev.get("class_path")} | ({"init_args": init_args} if init_args else {})
            merged[key] = spec
    return merged


MOVED = {"source": "source", "k": "k"}
"""Options that were the data's and are the method's now (``model.init_args.method.negatives.<name>``)."""


def _moved_option(key: str) -> str | None:
    parts = key.split(".")
    if parts[:1] == ["data"]:
        rest = parts[2:] if parts[1:2] == ["init_args"] else parts[1:]
        if len(rest) == 1 and rest[0] in MOVED:
            return rest[0]
    return None


def check_method_home(argv: Sequence[str]) -> None:
    """Refuse, in one line, a data-side ``source`` or ``k`` (in a ``--config`` file or on the command line):
    the negatives are the method's, and K has one home.

    Raises:
        ConfigError: naming the file or option and where the setting lives.
    """
    for _, path in _config_positions(argv):
        if not path.is_file():
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        node = data.get("data") if isinstance(data, dict) else None
        node = node.get("init_args", node) if isinstance(node, dict) else None
        for name in MOVED:
            if isinstance(node, dict) and name in node:
                raise ConfigError(f"--config {path}: data.init_args.{name} is the method's now: set "
                                  f"model.init_args.method.negatives.{name} (a method file of configs/methods)")
    for token in argv:
        if token.startswith("--") and (name := _moved_option(token[2:].split("=", 1)[0])):
            raise ConfigError(f"{token.split('=', 1)[0]} is the method's now: use "
                              f"--model.init_args.method.negatives.{name}")


def merged_terms_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with the ``--config`` files' term maps merged key by key (unchanged when fewer than two name terms).

    Raises:
        ConfigError: two method files are layered, or a file's terms are not a mapping.
    """
    from misp.methods import is_method_file

    argv = list(argv)
    positions = _config_positions(argv)
    method_files = [str(path) for _, path in positions if path.is_file() and is_method_file(path)]
    if len(method_files) > 1:
        raise ConfigError(f"--config names {len(method_files)} method files ({', '.join(method_files)}): layer one "
                          "method, and overlays that change its terms")
    layers = [(i, terms) for i, path in positions if (terms := _terms_of(path)) is not None]
    if len(layers) < 2:
        return argv
    merged = merge_terms([terms for _, terms in layers])
    last = layers[-1][0]
    return argv[: last + 1] + [f"--{TERMS_KEY}={json.dumps(merged)}"] + argv[last + 1:]
