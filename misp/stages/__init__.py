"""Base stages that give the Shapes world a pretrained-like CLIP and VLM: contrastive CLIP and SFT."""

from misp.stages.clip_stage import ContrastiveCLIPModule
from misp.stages.sft_stage import SFTModule

__all__ = ["ContrastiveCLIPModule", "SFTModule"]
