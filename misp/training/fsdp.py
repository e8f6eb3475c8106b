"""Lightning's FSDP strategy (FSDP1) for checkpoints that hold only the trainable state.

A QLoRA run trains a few million adapter weights over a frozen 4-bit base of several GB. misp's VLM modules
save only what trains (LoRA, the proposal, optimiser states; ``VLMModule.on_save_checkpoint``) and reload
the frozen base from its path, so a checkpoint is megabytes, not a copy of the base every N steps.
Lightning's own ``FSDPStrategy`` loads a sharded checkpoint into *every* key of the model and fails on the
ones that were left out; this subclass loads the keys the checkpoint has, checks that every trainable one
is among them, and keeps the rest as loaded from the base.

Every file of a sharded checkpoint is read safely: ``meta.pt`` with ``weights_only=True`` and ``.metadata``
through ``misp.checkpoints.read_dcp_metadata`` (torch's own reader would ``pickle.load`` it).

Everything else is Lightning's ``FSDPStrategy`` unchanged (same arguments, same checkpoint layout).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _get_sharded_state_dict_context, _is_sharded_checkpoint
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from lightning.pytorch.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from lightning.pytorch.trainer.states import TrainerFn

from misp.checkpoints import read_checkpoint, read_dcp_metadata, safe_file_system_reader


def saved_model_keys(path: Path) -> set[str]:
    """The model keys a sharded (torch.distributed.checkpoint) checkpoint folder holds."""
    keys = read_dcp_metadata(path).state_dict_metadata
    return {k.removeprefix("model.") for k in keys if k.startswith("model.")}


def keep_lora_inputs_as_given(model: torch.nn.Module) -> None:
    """Stop peft from casting each LoRA input to the dtype its weight shows outside the adapter's FSDP unit.

    Without CUDA autocast peft casts the input to ``lora_A.weight.dtype``. Under FSDP mixed precision that
    weight is the float32 shard between forwards and the bfloat16 gathered copy while prefetched, so the
    forward and its activation-checkpointing recomputation cast differently and torch refuses the
    recomputation. Inside its unit the adapter computes in FSDP's ``param_dtype`` anyway, which is what
    CUDA autocast gives on GPUs.
    """
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


class FSDPStrategy(LightningFSDPStrategy):
    """``lightning.pytorch.strategies.FSDPStrategy`` whose sharded checkpoints may leave the frozen base out,
    and whose mixed precision leaves the batch as the datamodule made it."""

    @property
    def mixed_precision_config(self):
        config = super().mixed_precision_config
        if config is not None and self.mixed_precision is None:
            # Lightning's config casts every float the root module receives, which for a LightningModule is
            # the whole batch: log q and the proposal's features would reach the loss rounded to bfloat16
            # (3 significant digits). Autocast already runs the matmuls in the low precision.
            config = dataclasses.replace(config, cast_root_forward_inputs=False)
        return config

    def fsdp_device_id(self) -> int | torch.device | None:
        """The ``device_id`` FSDP gets: this process's GPU index, as in Lightning."""
        return self.root_device.index

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # Lightning's wrapping, with the device id from one overridable place and peft's casting settled.
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.fsdp_device_id(),
            **self.kwargs,
        )
        if self.mixed_precision_config is not None:
            keep_lora_inputs_as_given(model)
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only=weights_only)

        from torch.distributed.checkpoint import load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        module = self.lightning_module
        saved = saved_model_keys(path)
        required = getattr(module, "trainable_state_keys", lambda: set())()
        missing = sorted(required - saved)
        if missing:
            raise ValueError(
                f"checkpoint {path} lacks {len(missing)} trainable weights of this model (e.g. {missing[:3]}): "
                "it was written for another model, adapter or method"
            )
        with _get_sharded_state_dict_context(self.model):
            # Start from the model's own state, so the keys left out of the checkpoint keep the base's values.
            module_state = {"model": self.model.state_dict()}
            # Every read of the folder's .metadata goes through misp's restricted unpickler, never pickle.load.
            load(module_state, storage_reader=safe_file_system_reader(path),
                 planner=DefaultLoadPlanner(allow_partial_load=True))
            self.model.load_state_dict(module_state["model"], strict=False)
            if module.trainer.state.fn == TrainerFn.FITTING and self.optimizers:
                reader = safe_file_system_reader(path)
                for idx, optimizer in enumerate(self.optimizers):
                    key = f"optimizer_{idx}"
                    state = load_sharded_optimizer_state_dict(
                        model_state_dict=module_state["model"], optimizer_key=key, storage_reader=reader
                    )
                    optimizer.load_state_dict(
                        FSDP.optim_state_dict_to_load(optim_state_dict=state[key], model=self.model, optim=optimizer)
                    )
        return read_checkpoint(path)  # meta.pt with weights_only=True, whatever Lightning asked
