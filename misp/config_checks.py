"""Checks of a parsed ``misp`` config that name the option (or the file) at fault, before any model loads.

Each check turns a mistake that would otherwise surface deep inside a run (a raw torch ``ValueError``, a
message blaming the records, an error after the whole fit) into one :class:`~misp.errors.ConfigError`:

- :func:`check_config_files`: every ``--config FILE`` is read as YAML first, so a syntax error names the
  file, line and column (jsonargparse's message names neither the file nor which ``--config`` it was);
- :func:`check_pairing`: the model's ``class_path`` and the data's are a pair misp trains (a CLIP module
  on CLIP data, ...), not a module fed batches of another kind (``KeyError: 'input_ids'`` at step 0);
- :func:`check_values`: no option holds NaN or infinity (``beta: .inf``); no learning rate is negative,
  and a fit's is not 0; a fit's ``trainer.max_epochs`` / ``trainer.max_steps`` is not 0; a fit's
  ``export_dir`` is not an existing file, nor a folder that cannot be created.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from misp.errors import ConfigError

LR_NAMES = ("lr", "learning_rate")
"""Option names (the last part of a key) read as learning rates."""


def config_file_args(argv: Sequence[str]) -> list[str]:
    """The values of every ``--config FILE`` / ``--config=FILE`` in ``argv``."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
    return out


def check_config_files(argv: Sequence[str]) -> None:
    """Raise a ConfigError naming the ``--config`` file whose YAML does not parse (line and column)."""
    for value in config_file_args(argv):
        path = Path(value)
        if not path.is_file():
            continue  # jsonargparse also takes inline YAML here, and names a missing file itself
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"--config {path}: not UTF-8 text (byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"--config {path}: not valid YAML: {where}{problem}") from None


def _items(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _items(v, f"{prefix}{k}.")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _items(v, f"{prefix}{i}.")
    else:
        yield prefix[:-1], value


def _plain_key(key: str) -> str:
    # jsonargparse stores class arguments as class_path/init_args; users write either form.
    return key.replace(".__path__", "")


def check_values(config: Any, subcommand: str | None) -> None:
    """Raise a ConfigError naming the first option whose value cannot be meant (see the module docstring).

    Args:
        config: the parsed config of one subcommand (a jsonargparse Namespace).
        subcommand: ``fit``, ``validate``, ``test``, ``predict`` (the learning-rate, budget and export
            checks apply to ``fit`` only, where they decide what is trained).
    """
    fitting = subcommand == "fit"
    for key, value in _items(config, ""):
        key = _plain_key(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {value} is not a finite number")
        if key.rsplit(".", 1)[-1] in LR_NAMES and isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < 0:
                raise ConfigError(f"{key}: a learning rate must be positive, got {value}")
            if value == 0 and fitting:
                raise ConfigError(f"{key}: a learning rate of 0 trains nothing (the base model would be exported "
                                  "as the trained one); set a positive learning rate")
    if not fitting:
        return
    trainer = getattr(config, "trainer", None)
    for option in ("max_epochs", "max_steps"):
        if trainer is not None and getattr(trainer, option, None) == 0:
            raise ConfigError(f"trainer.{option} is 0: the fit would train nothing and export the base model as "
                              "the trained one")
    model_args = getattr(getattr(config, "model", None), "init_args", None)
    export_dir = model_args.get("export_dir") if model_args is not None and hasattr(model_args, "get") else None
    if export_dir:
        check_export_dir(Path(export_dir), "model.init_args.export_dir")


def check_export_dir(path: Path, option: str) -> None:
    """Fail now if ``path`` cannot become the export folder: an existing file, or not creatable."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is an existing file, not a folder; the export after the fit would "
                          "fail (checked before training)")
    parent = next((p for p in [path, *path.parents] if p.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise ConfigError(f"{option} {path}: cannot be created ({parent} is not a writable folder); checked "
                          "before training")


PAIRS = {
    "misp.stages.clip_stage.ContrastiveCLIPModule": ("misp.data.clip_data.ClipDataModule",),
    "misp.stages.sft_stage.SFTModule": ("misp.data.sft_data.SFTDataModule",),
    "misp.dpo.module.MISPDPOModule": ("misp.data.negative_sampler.NegativeSamplerDataModule",),
    "misp.sae.module.SAEModule": ("misp.data.negative_sampler.NegativeSamplerDataModule",),
}
"""misp's modules and the datamodules whose batches they take (subclasses count as their base). A class
outside this table (a user's own) is not checked."""


def _known(cls: type, names) -> str | None:
    return next((f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__
                 if f"{c.__module__}.{c.__qualname__}" in names), None)


def check_pairing(config: Any) -> None:
    """Raise a ConfigError when ``model.class_path`` and ``data.class_path`` are misp classes that do not
    go together (see ``PAIRS``), naming both options."""
    from jsonargparse.typing import import_object

    model, data = getattr(config, "model", None), getattr(config, "data", None)
    model_path, data_path = getattr(model, "class_path", None), getattr(data, "class_path", None)
    if not isinstance(model_path, str) or not isinstance(data_path, str):
        return
    try:
        model_cls, data_cls = import_object(model_path), import_object(data_path)
    except (ImportError, AttributeError, ValueError):
        return  # jsonargparse has named an unknown class already
    module_kind = _known(model_cls, PAIRS)
    accepted = {d for pairs in PAIRS.values() for d in pairs}
    data_kind = _known(data_cls, accepted)
    if module_kind is None or data_kind is None or data_kind in PAIRS[module_kind]:
        return
    wanted = " or ".join(PAIRS[module_kind])
    raise ConfigError(f"model.class_path {model_path} trains on the batches of {wanted}, but data.class_path is "
                      f"{data_path}; use the config pair that belongs together (configs/shapes/*.yaml)")
