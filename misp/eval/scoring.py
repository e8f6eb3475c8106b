"""Summed response log-probabilities of one text under several images (likelihood grounding).

Each (prompt, response) is tokenised once and scored against every image it is paired with, in row
batches of at most ``max_rows``; a record's rows stay in one batch, so each image is encoded exactly once
by ``vlm_logits``. The score is ``logp(y|x,m)`` of method.md: the SUM over response tokens (EOS included),
as the DPO losses use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import ProcessorMixin

from misp.logprobs import sequence_logps
from misp.models.families import family_for_processor
from misp.models.forward import expand_image_rows, vlm_logits
from misp.models.generation import _input_device
from misp.models.prompting import collate_examples, encode_example, prepare_images


@torch.no_grad()
def response_logps_per_image(
    model: nn.Module,
    processor: ProcessorMixin,
    items: Sequence[tuple[str, str, Sequence[Image.Image]]],
    max_rows: int = 16,
) -> list[Tensor]:
    """``logp(response | prompt, image)`` for every image of every item.

    Args:
        model: a VLM of a registered family (plain, peft-wrapped, quantised or sharded; see ``vlm_logits``).
        processor: its processor.
        items: ``(prompt, response, images)`` triples; ``images`` must be non-empty.
        max_rows: most (text, image) rows per forward; an item with more images still runs whole.

    Returns:
        One float32 CPU tensor per item, ``[len(images)]``, in the order given.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    for i, (_, _, images) in enumerate(items):
        if not images:
            raise ValueError(f"item {i} has no image to score its response against")
    device = _input_device(model)
    pad = processor.tokenizer.pad_token_id
    out: list[Tensor] = []
    was_training = model.training
    model.eval()
    try:
        start = 0
        while start < len(items):
            end, rows = start, 0
            while end < len(items) and (end == start or rows + len(items[end][2]) <= max_rows):
                rows += len(items[end][2])
                end += 1
            chunk = items[start:end]
            examples, images = [], []
            for prompt, response, imgs in chunk:
                encoded = encode_example(processor, prompt, response)
                examples += [encoded] * len(imgs)
                images += list(imgs)
            batch = collate_examples(examples, pad)
            prepared = prepare_images(processor, images).to(device)
            # Families whose image token count depends on the image keep one placeholder per row until here.
            ids, mask, labels = expand_image_rows(
                batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"].to(device),
                family_for_processor(processor).image_token_id(processor), prepared.tokens_per_image,
            )
            logits = vlm_logits(model, ids, mask, prepared)
            logps = sequence_logps(logits, labels).float().cpu()
            offset = 0
            for _, _, imgs in chunk:
                out.append(logps[offset : offset + len(imgs)])
                offset += len(imgs)
            start = end
    finally:
        model.train(was_training)
    return out
