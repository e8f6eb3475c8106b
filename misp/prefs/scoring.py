"""CLIP scores of responses (method.md section 5) and the zero-shot text-heavy image test.

A response's score is ``100 * cos(h_v(image), h_t(sentence))`` for each of its sentences, aggregated by
the mean or the minimum. Why per sentence: CLIP's text encoder has a short context (77 BPE tokens for
the OpenAI models, 32 for the tiny Shapes CLIP) and open_clip's tokenizer cuts longer texts, so a long
response tokenised whole is scored on its first sentences only; a hallucination in its last sentence
would be invisible. CLIP is also trained on caption-length texts, which sentences resemble. A single
sentence longer than the context is still cut; that is rare for captions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from misp.negatives.embed import embed_texts

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")
_LETTER = re.compile(r"[^\W\d_]")
_FALLBACK_LOGIT_SCALE = 100.0  # CLIP's trained temperature (it clamps exp(logit_scale) at 100)


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by whitespace, and at newlines.

    Pieces without a letter (a list marker "1.", a lone ".") are dropped, so spacing from a word-level
    tokenizer's decode ("a red circle . a blue square .") splits like ordinary text. An abbreviation
    followed by a space ("Mr. Smith") also splits, which costs a slightly off score, not a wrong one.
    """
    return [s for s in (p.strip() for p in _SENTENCE_BREAK.split(text)) if _LETTER.search(s)]


def aggregate(scores: Sequence[float], how: str) -> float:
    """Combine sentence scores into a response score: their ``mean`` or their ``min``."""
    if not scores:
        raise ValueError("aggregate needs at least one sentence score")
    if how == "mean":
        return math.fsum(scores) / len(scores)
    if how == "min":
        return min(scores)
    raise ValueError(f"aggregate must be 'mean' or 'min', got {how!r}")


@dataclass(frozen=True)
class ResponseScore:
    """CLIP's judgement of one response."""

    score: float
    """The aggregated score."""
    sentences: tuple[float, ...]
    """``100 * cos`` of each sentence, in order."""


def score_responses(
    bundle: Any,
    image_embeddings: torch.Tensor,
    responses: Sequence[Sequence[str]],
    how: str = "mean",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> list[list[ResponseScore]]:
    """Score each example's responses against its image.

    Args:
        bundle: a ClipBundle (``model``, ``tokenizer``, ``identity``).
        image_embeddings: ``[E, d]`` L2-normalised CLIP image embeddings, one per example.
        responses: for each example its responses; each must have at least one sentence
            (``split_sentences``), so drop empty ones first.
        how: sentence aggregation, ``mean`` or ``min``.
        batch_size: sentences per CLIP forward pass.
        device: where CLIP runs.

    Returns:
        For each example, one ``ResponseScore`` per response, in order.
    """
    if len(responses) != image_embeddings.shape[0]:
        raise ValueError(f"{image_embeddings.shape[0]} image embeddings but {len(responses)} examples")
    split = [[split_sentences(r) for r in rs] for rs in responses]
    # Embed each distinct sentence once: sampled responses of one image share many sentences.
    index: dict[str, int] = {}
    for sentences in (s for rs in split for s in rs):
        if not sentences:
            raise ValueError("score_responses got a response without a sentence; drop empty responses first")
        for s in sentences:
            index.setdefault(s, len(index))
    if not index:
        return [[] for _ in responses]
    text = embed_texts(bundle, list(index), batch_size=batch_size, device=device, progress=False)
    out = []
    for e, rs in enumerate(split):
        rows = [index[s] for sentences in rs for s in sentences]
        cos = iter((100.0 * (text[rows] @ image_embeddings[e].float())).tolist())
        scored = []
        for sentences in rs:
            per = tuple(next(cos) for _ in sentences)
            scored.append(ResponseScore(aggregate(per, how), per))
        out.append(scored)
    return out


def text_heavy_probability(
    bundle: Any,
    image_embeddings: torch.Tensor,
    text_prompt: str,
    photo_prompt: str,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Zero-shot probability that each image is text-heavy: CLIP's softmax over the two prompts.

    ``softmax(s * [cos(h_v, h_t(text_prompt)), cos(h_v, h_t(photo_prompt))])[0]`` with the model's own
    logit scale ``s = exp(logit_scale)`` (100 when the model has none), as CLIP classifies zero-shot.

    Args:
        bundle: a ClipBundle.
        image_embeddings: ``[E, d]`` L2-normalised image embeddings.
        text_prompt: the text-heavy class, e.g. "an image with a lot of text".
        photo_prompt: the ordinary class, e.g. "a photo".
        device: where CLIP runs.

    Returns:
        ``[E]`` float32 probabilities of the text-heavy class.
    """
    prompts = embed_texts(bundle, [text_prompt, photo_prompt], device=device, progress=False)
    logit_scale = getattr(bundle.model, "logit_scale", None)
    scale = (
        float(logit_scale.detach().float().exp().reshape(-1)[0])
        if logit_scale is not None
        else _FALLBACK_LOGIT_SCALE
    )
    logits = scale * image_embeddings.float() @ prompts.T
    return logits.softmax(dim=-1)[:, 0]
