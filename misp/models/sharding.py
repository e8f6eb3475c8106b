"""Sharding a LLaVA-style VLM: FSDP2 (``fully_shard`` per decoder layer, then the whole model) under
Lightning's ``ModelParallelStrategy``, the FSDP1 wrap policy for ``strategy=fsdp`` with LoRA, and reading
sharded parameters outside forward.

The decoder layer is the wrap and activation-checkpointing unit in both.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the language model and the vision tower, as the model's family names them."""
    from misp.models.families import family_of

    family = family_of(model)
    return [m for m in model.modules() if family.is_block(m)]


def shard_vlm(model: nn.Module, mesh) -> nn.Module:
    """Shard each transformer block, then the remaining parameters (embeddings, projector, head)."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True for FSDP2 (DTensor parameters) and FSDP1 (FullyShardedDataParallel wrappers) models."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters()) or any(
        isinstance(m, FullyShardedDataParallel) for m in model.modules()
    )


def gather_full_state_dict(model: nn.Module, trainable_only: bool = False, prefix: str = "") -> dict:
    """The unsharded state dict on CPU on rank 0 (empty elsewhere). A collective: every rank must call it.

    Args:
        model: the outermost sharded module. Under FSDP1 that is the root FSDP wrapper (Lightning's
            ``trainer.strategy.model``): a submodule inside it cannot gather on its own.
        trainable_only: leave frozen parameters out (a LoRA export needs only the adapters, not a gathered
            copy of the whole 4-bit base).
        prefix: keep only keys under this prefix, with the prefix removed (e.g. ``"model."`` for the
            policy inside a LightningModule).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # With frozen parameters left out every rank gathers the (small) trainable state: torch's rank-0-only
    # gathering (cpu_offload) pops the frozen keys from the other ranks' empty dicts and fails.
    options = StateDictOptions(full_state_dict=True, cpu_offload=not trainable_only, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    if trainable_only and torch.distributed.get_rank() != 0:
        return {}
    return {k[len(prefix):]: v.cpu() for k, v in state.items() if k.startswith(prefix)}


class TrainableLeafWrapPolicy(ModuleWrapPolicy):
    """FSDP1 units for a partly frozen model: the given layer classes, plus each module that owns trainable
    parameters beside frozen ones (LoRA's ``lora_A``/``lora_B``, the proposal q_phi).

    FSDP1 flattens each unit's parameters into one tensor of one dtype. QLoRA keeps its adapters (and their
    AdamW states) in float32 over a bfloat16-stored 4-bit base, so the adapters need units of their own; a
    decoder-layer unit alone would mix the two dtypes and FSDP refuses it. Own units also let the proposal
    be gathered alone when the datamodule reads it between steps (``unsharded``). This is peft's
    ``fsdp_auto_wrap_policy`` rule, typed so that a YAML config can name it.

    Args:
        layer_classes: the transformer blocks to wrap (e.g. ``LlamaDecoderLayer``), as with
            ``FSDPStrategy(auto_wrap_policy=[...])``.
    """

    def __init__(self, layer_classes: list[type[nn.Module]]) -> None:
        super().__init__(set(layer_classes))

    def _run_policy(self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict) -> dict:
        target = super()._run_policy(root_module, ignored_modules, root_kwargs)
        partly_frozen = any(not p.requires_grad for p in root_module.parameters())
        for module in root_module.modules():
            if module is root_module or module in ignored_modules:
                continue
            own = list(module.parameters(recurse=False))
            trainable_leaf = partly_frozen and own and all(p.requires_grad for p in own)
            if trainable_leaf or getattr(module, "fsdp_own_unit", False):
                target[module] = dict(root_kwargs)
        return target


@contextmanager
def unsharded(module: nn.Module, root: nn.Module | None = None) -> Iterator[nn.Module]:
    """A module whose parameters are whole on this rank, for use outside forward (a collective when sharded).

    - FSDP1 unit: its parameters are gathered for the duration (``summon_full_params``).
    - inside an FSDP1 ``root`` without a unit of its own: the root's own parameters are gathered.
    - FSDP2 (DTensor parameters): a plain copy holding the full tensors.
    - otherwise: the module itself.
    Every rank must enter it together. Changes made inside are not written back.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor

    if isinstance(module, FSDP):
        if isinstance(root, FSDP):
            # A unit used before the root's first forward would set itself up as a root, and the root's
            # first forward would then fail ("Non-root FSDP instance's _is_root ..."): set up from the root.
            from torch.distributed.fsdp._runtime_utils import _lazy_init

            _lazy_init(root, root)
        with FSDP.summon_full_params(module, writeback=False):
            yield module.module
    elif isinstance(root, FSDP):
        with FSDP.summon_full_params(root, writeback=False, recurse=False):
            yield module
    elif any(isinstance(p, DTensor) for p in module.parameters()):
        full = copy.deepcopy(module)  # DTensor parameters deep-copy as DTensors; replaced just below
        for name, param in module.named_parameters():
            parent, _, leaf = name.rpartition(".")
            owner = full.get_submodule(parent) if parent else full
            setattr(owner, leaf, nn.Parameter(param.full_tensor().detach(), requires_grad=False))
        yield full
    else:
        yield module
