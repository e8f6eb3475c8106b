"""Hyperparameters as plain data, so checkpoints load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import inspect
from dataclasses import fields, is_dataclass

import lightning as L


def save_plain_hyperparameters(module: L.LightningModule | L.LightningDataModule) -> None:
    """``save_hyperparameters`` of the caller's ``__init__`` args, with dataclass configs as dicts.

    Under LightningCLI the hparams are already the parsed config; built directly (a notebook, a test),
    they would hold dataclass instances, which a safe checkpoint load refuses to unpickle.
    """
    init_frame = inspect.currentframe().f_back  # the __init__ that called us
    module.save_hyperparameters(frame=init_frame)
    for key, value in list(module.hparams.items()):
        module.hparams[key] = plain(value)


def plain(value):
    """``value`` as dicts, lists and scalars: dataclasses by their fields, other objects (an objective's
    terms) as the ``{class_path, init_args}`` a config would write for them."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "__dict__") and not isinstance(value, type):
        cls = type(value)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": plain(vars(value))}
    return value
