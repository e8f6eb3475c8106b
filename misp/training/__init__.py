"""What training a VLM under Lightning needs beyond the model: the FSDP strategy with trainable-state checkpoints."""

from misp.training.fsdp import FSDPStrategy

__all__ = ["FSDPStrategy"]
