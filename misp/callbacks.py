"""Lightning callbacks ``misp`` adds to every Trainer it builds.

- :class:`FiniteLossGuard` stops training at the first NaN or infinite loss, before the backward pass,
  the optimizer step or any checkpoint of that step, so the last checkpoint written is the last good one.
  The error names the global step, the epoch, the batch index and the batch's record ids.
- :class:`SettingsCheck` warns once at the start of fit about settings that run but are degenerate
  (``proposal_eps = 0``: importance weights without a bound).
- :class:`TrainsSomething` refuses a fit that would train nothing (every learning rate 0) and one that
  took no optimizer step (no training batch), before anything is exported; a fit that reached its end
  writes ``fit_done.json`` in the run's root, the mark ``misp experiment`` records a fit by (an
  interrupted or failed fit never writes it).
- :class:`FiniteWeightsCheck` refuses to evaluate (``misp validate`` / ``misp test``) a model holding a
  NaN or infinite weight, naming the checkpoint and the weight: its metrics would be meaningless zeros.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from misp.errors import UserError
from misp.utils.io import atomic_write_json

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


FIT_DONE = "fit_done.json"
"""Written in ``trainer.default_root_dir`` by :class:`TrainsSomething` when a fit reaches its end."""


class TrainedNothing(UserError, RuntimeError):
    """A fit would train, or has trained, nothing: its result would be the untrained model."""


class NonFiniteWeights(UserError, RuntimeError):
    """The model to evaluate holds a NaN or infinite weight."""


class TrainsSomething(L.Callback):
    """Refuse a fit that trains nothing; mark a fit that reached its end (see the module docstring).

    Its ``on_fit_end`` runs before the module's (Lightning calls callbacks first), so a fit with no
    optimizer step raises before the module exports the base model as the trained one.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        groups = [g for opt in trainer.optimizers for g in opt.param_groups if g.get("params")]
        # A warm-up schedule sets the running lr to 0 at step 0; "initial_lr" is the configured peak.
        peaks = [float(g.get("initial_lr", g.get("lr", 0.0))) for g in groups]
        if groups and all(p == 0.0 for p in peaks):
            raise TrainedNothing(
                "every optimizer parameter group has learning rate 0 (model.init_args.lr?): the fit would change no "
                "weight and export the base model as the trained one; set a positive learning rate"
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            raise TrainedNothing(
                f"the fit took no optimizer step (epochs {trainer.current_epoch}, trainer.max_epochs "
                f"{trainer.max_epochs}, trainer.max_steps {trainer.max_steps}, trainer.limit_train_batches "
                f"{trainer.limit_train_batches}, {trainer.num_training_batches} training batches): nothing was "
                "trained, so nothing is exported; check the training records and those limits"
            )
        if trainer.is_global_zero:
            atomic_write_json(Path(trainer.default_root_dir) / FIT_DONE, {
                "global_step": trainer.global_step, "epochs": trainer.current_epoch,
                "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                "stopped_early": bool(trainer.should_stop),
            })


class FiniteWeightsCheck(L.Callback):
    """Refuse to evaluate a model holding a non-finite weight (``misp validate`` / ``misp test``)."""

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn not in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            return  # inside a fit, FiniteLossGuard stops training before a non-finite update
        # A quantised layer's weight holds packed integers (stored as bf16 under FSDP, so that it flattens
        # with the rest): its bit patterns are not numbers, and any of them may read as NaN.
        packed = {id(m.weight) for m in pl_module.modules()
                  if type(m).__name__ in ("Linear4bit", "Linear8bitLt") and getattr(m, "weight", None) is not None}
        for name, param in pl_module.named_parameters():
            if id(param) in packed:
                continue
            if param.is_floating_point() and param.numel() and not bool(torch.isfinite(param.detach()).all()):
                bad = int((~torch.isfinite(param.detach())).sum())
                source = f"checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else "the model (no --ckpt_path)"
                raise NonFiniteWeights(
                    f"{source}: weight {name} holds {bad} NaN or infinite value(s) of {param.numel()}; its "
                    "evaluation would be meaningless, so misp refuses it. Evaluate an earlier checkpoint"
                )

    on_validation_start = on_test_start = _check

