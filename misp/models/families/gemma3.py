"""Gemma 3 with images (``google/gemma-3-4b-it``, ``-12b-it``, ``-27b-it``): a SigLIP tower pooled to a fixed
256 tokens per image, ``<start_of_image>`` in the chat template expanded by the processor into the image
tokens between ``<start_of_image>`` and ``<end_of_image>``, and image tokens that attend to each other
both ways (``token_type_ids``, which training must pass)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image
from torch import nn
from transformers import ProcessorMixin

from misp.batch import ImageInputs
from misp.models.families.base import ModelFamily, unwrapped
from misp.models.families.llava import Llava15Family, position_ids_from_mask, rgb


class Gemma3Family(ModelFamily):
    """Gemma 3: fixed image token count, the LLaVA-style projector hook, 1-D positions, token types."""

    name = "gemma-3"
    model_types = ("gemma3",)
    processor_classes = ("Gemma3Processor",)
    examples = "google/gemma-3-4b-it, google/gemma-3-12b-it, google/gemma-3-27b-it"
    unquantized_modules = ("vision_tower", "multi_modal_projector", "lm_head")
    response_separator = ""
    bidirectional_image_attention = True

    def image_token(self, processor: ProcessorMixin) -> str:
        """``<image_soft_token>``, the token the image features replace (the chat template writes
        ``<start_of_image>``, which the processor expands)."""
        return processor.tokenizer.image_token

    def fixed_image_tokens(self, processor: ProcessorMixin) -> int:
        """``image_seq_length`` (256 for the released models; no pan-and-scan crops)."""
        if getattr(processor.image_processor, "do_pan_and_scan", False):
            raise ValueError("Gemma 3 with pan-and-scan gives a varying number of crops per image; misp needs it off")
        return int(processor.image_seq_length)

    def expand_image_text(self, processor: ProcessorMixin, text: str) -> str:
        """The processor's own expansion: ``<start_of_image>`` -> ``\\n\\n<start_of_image>`` + image tokens +
        ``<end_of_image>\\n\\n``."""
        return text.replace(processor.boi_token, processor.full_image_sequence)

    def prepare_images(self, processor: ProcessorMixin, images: Sequence[Image.Image]) -> ImageInputs:
        """``pixel_values [U, 3, H, W]``; every image is ``image_seq_length`` tokens."""
        pixels = processor.image_processor(images=rgb(images), return_tensors="pt")["pixel_values"]
        return ImageInputs({"pixel_values": pixels}, torch.full((len(images),), self.fixed_image_tokens(processor)))

    def forward_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       images: ImageInputs, image_index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The pixels, positions over real tokens, and ``token_type_ids`` (1 on image tokens) for the
        bidirectional attention within each image."""
        image_id = int(model.config.image_token_id)
        return {"pixel_values": images.tensors["pixel_values"], "position_ids": position_ids_from_mask(attention_mask),
                "token_type_ids": (input_ids == image_id).long()}

    def prefix_sharing_refusal(self, model: nn.Module, attention_mask: torch.Tensor) -> str | None:
        """As every family, and: a 4-D mask replaces both of Gemma 3's masks, the sliding-window layers'
        too, so packed rows are exact only while no row is longer than the sliding window."""
        reason = super().prefix_sharing_refusal(model, attention_mask)
        if reason is not None:
            return reason
        text = unwrapped(model).config.get_text_config()
        window = getattr(text, "sliding_window", None)
        longest = int(attention_mask.sum(1).max()) if attention_mask.numel() else 0
        if window is not None and longest > int(window):
            return (f"{self.name}: a row of {longest} tokens is longer than the sliding window ({window}), which "
                    "one 4-D block mask cannot express")
        return None

    @contextmanager
    def shared_images(self, model: nn.Module, images: ImageInputs, image_index: torch.Tensor | None) -> Iterator[None]:
        """As LLaVA: the projector's output ``[U, tokens, H]`` repeated into the rows by ``image_index``."""
        with Llava15Family().shared_images(model, images, image_index):
            yield
