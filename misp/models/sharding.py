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
