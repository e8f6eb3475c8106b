"""Faults injected into `misp` subprocesses by tests/test_faults.py (on the child's PYTHONPATH).

Not a test module: pytest collects test_*.py only.
"""

from __future__ import annotations

import os
import signal

import lightning as L
import torch


class KillAt(L.Callback):
    """SIGKILL this process at the end of training step ``step``, as `kill -9` from outside would.

    Lightning runs ModelCheckpoint's hooks after every other callback's, so the process dies after the
    step's update and before that step's checkpoint: mid-epoch, with the previous checkpoint on disk.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonLoss(L.Callback):
    """Make the training loss NaN at global step ``step`` (a stand-in for a diverging run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            original = pl_module.training_step

            def poisoned(*args, **kwargs):
                pl_module.training_step = original
                return original(*args, **kwargs) * torch.tensor(float("nan"))

            pl_module.training_step = poisoned


class TermAt(L.Callback):
    """Send this process a real SIGTERM at the end of training step ``step`` (as `kill` or a scheduler would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
