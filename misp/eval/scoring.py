"""Summed response log-probabilities of one text under several images (likelihood grounding).

Each (prompt, response) is tokenised once and scored against every image it is paired with, in row
batches of at most ``max_rows``; a record's rows stay in one batch, so each image is encoded exactly once
by ``vlm_logits``. The score is ``logp(y|x,m)`` of method.md: the SUM over response tokens (EOS included),
as the DPO losses use it.

With ``spans``, an item scores only the response tokens of a character span of its response (the
partner-token probe, ``misp.eval.partner_probe``): the tokens are found by encoding the response's text
before the span and up to its end, which must tokenise as prefixes of the whole response's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn
from transformers import ProcessorMixin

from misp.logprobs import IGNORE_INDEX, sequence_logps
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
    spans: Sequence[tuple[int, int] | None] | None = None,
) -> list[Tensor]:
    """``logp(response | prompt, image)`` for every image of every item.

    Args:
        model: a VLM of a registered family (plain, peft-wrapped, quantised or sharded; see ``vlm_logits``).
        processor: its processor.
        items: ``(prompt, response, images)`` triples; ``images`` must be non-empty.
        max_rows: most (text, image) rows per forward; an item with more images still runs whole.
        spans: per item, ``(start, end)`` character offsets into its response: score only the tokens that
            spell ``response[start:end]`` (EOS excluded); None (or a None entry) scores the whole response.

    Returns:
        One float32 CPU tensor per item, ``[len(images)]``, in the order given.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    for i, (_, _, images) in enumerate(items):
        if not images:
            raise ValueError(f"item {i} has no image to score its response against")
    if spans is not None and len(spans) != len(items):
        raise ValueError(f"{len(spans)} spans for {len(items)} items (one each, None for a whole response)")
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
            for k, (prompt, response, imgs) in enumerate(chunk, start=start):
                encoded = encode_example(processor, prompt, response)
                if spans is not None and spans[k] is not None:
                    encoded = {**encoded, "labels": span_labels(processor, prompt, response, encoded["labels"], spans[k])}
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


def _response_tokens(processor: ProcessorMixin, prompt: str, text: str) -> list[int]:
    """The response token ids of ``text`` after ``prompt``, EOS left out."""
    if not text.strip():
        return []
    return [t for t in encode_example(processor, prompt, text)["labels"] if t != IGNORE_INDEX][:-1]


def span_labels(
    processor: ProcessorMixin, prompt: str, response: str, labels: list[int], span: tuple[int, int]
) -> list[int]:
    """``labels`` (of ``encode_example(processor, prompt, response)``) with every response token outside
    the character span ``response[start:end]`` (and EOS) set to ``IGNORE_INDEX``.

    The span's tokens are those between the tokens of ``response[:start]`` (trailing spaces dropped: a
    BPE tokenizer gives the space to the next word) and those of ``response[:end]``; a tokenizer that
    does not tokenise both as prefixes of the whole response is a ``ValueError`` naming the text.
    """
    start, end = span
    if not 0 <= start < end <= len(response):
        raise ValueError(f"span {list(span)} does not lie within the response of {len(response)} characters")
    whole = [t for t in labels if t != IGNORE_INDEX][:-1]
    bounds = []
    for text in (response[:start].rstrip(), response[:end]):
        ids = _response_tokens(processor, prompt, text)
        if ids != whole[: len(ids)]:
            raise ValueError(
                f"the tokens of {text[-40:]!r} are not a prefix of the response's tokens, so the span "
                f"{list(span)} of {response[:80]!r} has no token boundary there"
            )
        bounds.append(len(ids))
    first, last = bounds
    out, k = [], 0
    for t in labels:
        if t == IGNORE_INDEX:
            out.append(t)
            continue
        out.append(t if first <= k < last else IGNORE_INDEX)
        k += 1
    return out
