"""Training a VLM under Lightning: the shared module base, its optimiser, and the
FSDP strategy whose checkpoints hold the trainable state only."""

from misp.training.fsdp import FSDPStrategy
from misp.training.vlm_module import VLMModule

__all__ = ["FSDPStrategy", "VLMModule"]
