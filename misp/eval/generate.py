"""Generation for benchmark evaluation: the one entry point every benchmark's answers go through.

Greedy (the published numbers are greedy), batched with prompts sorted by token length (similar
lengths share a batch, so little padding is computed; the longest batch comes first, so an
out-of-memory error shows at once), each benchmark's own answer length, and the model family's stop
tokens. It routes through :func:`misp.models.generation.generate`, which owns templating and decoding
per family.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers import ProcessorMixin

from misp.images import load_rgb
from misp.models.generation import generate


def stop_token_ids(model: nn.Module, processor: ProcessorMixin) -> list[int]:
    """The tokens that end an answer: the tokenizer's EOS and every EOS of the model's generation config
    (a chat family lists its end-of-turn token there, e.g. Qwen's ``<|im_end|>`` and ``<|endoftext|>``)."""
    ids: list[int] = []
    eos = processor.tokenizer.eos_token_id
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None) if config is not None else None
    for value in (eos, *(configured if isinstance(configured, list | tuple) else (configured,))):
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def longest_first(processor: ProcessorMixin, prompts: Sequence[str]) -> list[int]:
    """Indices of ``prompts`` by decreasing token length (ties keep their order)."""
    tokenizer = processor.tokenizer
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    return sorted(range(len(prompts)), key=lambda i: -lengths[i])


def generate_answers(
    model: nn.Module,
    processor: ProcessorMixin,
    images: Sequence[str | Path],
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to ``prompts`` about ``images`` (files), in the order given.

    Args:
        model: the VLM (plain, peft-wrapped, quantised).
        processor: its processor.
        images: one image file per prompt; each is opened when its batch runs.
        prompts: the user texts, without the chat template.
        max_new_tokens: the longest answer, in tokens.
        batch_size: prompts per ``generate`` call.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one image per prompt")
    order = longest_first(processor, prompts)
    stops = stop_token_ids(model, processor)
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out = generate(
            model, processor, [load_rgb(images[i]) for i in chunk], [prompts[i] for i in chunk],
            max_new_tokens=max_new_tokens, do_sample=False, batch_size=len(chunk), stop_token_ids=stops,
        )
        for i, texts in zip(chunk, out, strict=True):
            answers[i] = texts[0]
    return answers
