"""FSDP2 sharding of a LLaVA-style VLM (``fully_shard`` per decoder layer, then the whole model).

Used by modules under Lightning's ``ModelParallelStrategy``. The decoder layer is the wrap and
activation-checkpointing unit, as in the FSDP1 configs (``strategy=fsdp``).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import fully_shard


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of the language model and the vision tower, found by class name."""
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]


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


def gather_full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict, under the model's own key names, on CPU on rank 0 (empty elsewhere).

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
