"""Hyperparameters as plain data, so checkpoints load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import inspect
from dataclasses import asdict, is_dataclass

import lightning as L


def save_plain_hyperparameters(module: L.LightningModule | L.LightningDataModule) -> None:
    """``save_hyperparameters`` of the caller's ``__init__`` args, with dataclass configs as dicts.

    Under LightningCLI the hparams are already the parsed config; built directly (a notebook, a test),
    they would hold dataclass instances, which a safe checkpoint load refuses to unpickle.
    """
    init_frame = inspect.currentframe().f_back  # the __init__ that called us
    module.save_hyperparameters(frame=init_frame)
    for key, value in list(module.hparams.items()):
        if is_dataclass(value) and not isinstance(value, type):
            module.hparams[key] = asdict(value)
