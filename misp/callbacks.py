"""Lightning callbacks ``misp`` adds to every Trainer it builds.

- :class:`FiniteLossGuard` stops training at the first NaN or infinite loss, before the backward pass,
  the optimizer step or any checkpoint of that step, so the last checkpoint written is the last good one.
  The error names the global step, the epoch, the batch index and the batch's record ids.
- :class:`SettingsCheck` warns once at the start of fit about settings that run but are degenerate
  (``proposal_eps = 0``: importance weights without a bound).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from misp.errors import UserError

log = logging.getLogger(__name__)

MAX_IDS_SHOWN = 16
"""Record ids listed in the error; a larger batch is summarised by its count."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; training stopped before that step changed any weight or file."""


def batch_ids(batch: Any) -> list[str] | None:
    """The record ids of a batch: its ``ids`` (a PreferenceBatch's field; SFT and CLIP batches' key), else None."""
    ids = batch.get("ids") if isinstance(batch, dict) else getattr(batch, "ids", None)
    return [str(i) for i in ids] if ids is not None else None


class FiniteLossGuard(L.Callback):
    """Raise :class:`TrainingDiverged` when a training loss is not finite, naming the step and the records.

    The check runs in ``on_before_backward``: after the forward pass and before gradients, the optimizer
    step and the ``on_train_batch_end`` checkpoint of that step. Lightning then stops the run (and
    ``ModelCheckpoint`` does not save on an exception unless ``save_on_exception`` is set), so every
    checkpoint on disk holds finite weights from before the bad batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ids: list[str] | None = None
        self._batch_idx = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._ids, self._batch_idx = batch_ids(batch), batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # One device-to-host sync per step (and one tiny all-reduce when sharded): negligible next to a VLM
        # forward pass. Every rank must stop together, or the others would wait in backward's collectives.
        local_bad = not bool(torch.isfinite(loss.detach()).all())
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False) if trainer.world_size > 1 else local_bad
        if not bad:
            return
        value = loss.detach().float().flatten()[0].item() if loss.numel() else float("nan")
        where = f" on rank {trainer.global_rank} of {trainer.world_size}" if trainer.world_size > 1 else ""
        if not local_bad:
            value = f"finite here ({value}) but not on another rank"
        if self._ids is None:
            records = "record ids: not in this batch"
        elif len(self._ids) <= MAX_IDS_SHOWN:
            records = f"record ids: {', '.join(self._ids)}"
        else:
            records = f"record ids ({len(self._ids)}): {', '.join(self._ids[:MAX_IDS_SHOWN])}, ..."
        last = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
            trainer.checkpoint_callback, "best_model_path", ""
        )
        resume = f"; the last good checkpoint is {last}" if last else "; no checkpoint was written"
        raise TrainingDiverged(
            f"the training loss is {value} at global step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {self._batch_idx}{where}); {records}. Training stopped before this step's update{resume}. "
            "Look at those records, or lower the learning rate"
        )


class SettingsCheck(L.Callback):
    """Warn about settings that train without error but defeat their own purpose."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        proposal = getattr(pl_module, "proposal", None)
        objective = getattr(pl_module, "objective", None)
        weighted = any(getattr(t, "importance_sampling", False) for t in getattr(objective, "terms", []))
        if proposal is not None and getattr(proposal, "eps", None) == 0.0 and weighted:
            log.warning(
                "model.init_args.proposal_eps is 0: the proposal q_phi has no floor, so the importance weights "
                "exp(a)/q are unbounded and one negative the proposal neglects can dominate a batch's loss; "
                "the default 0.1 bounds every weight by M / eps"
            )
