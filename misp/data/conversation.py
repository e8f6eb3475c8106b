"""The one place a multi-turn record's prompt is rendered into the model's prompt text.

A single-turn record (no ``history``) is left as it is: ``encode_example`` puts its prompt in the model's
template exactly as before. A conversation is rendered with the processor's chat template (LLaVA-1.5's,
misp's own template, when the processor has none), with the record's one image in the first user turn
and a generation prompt after the last user turn; the rendered text holds the ``<image>`` placeholder, so
``encode_example`` takes it as templated and expands the image there. Only the responses are scored:
earlier assistant turns are context, labelled -100 like the rest of the prompt.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from misp.data.records import PreferenceRecord, ReadResult


def chat_messages(history: tuple[tuple[str, str], ...], prompt: str) -> list[dict[str, Any]]:
    """The conversation as chat-template messages: the image goes in the first user turn."""
    messages: list[dict[str, Any]] = []
    placed = False
    for role, text in (*history, ("user", prompt)):
        content: list[dict[str, Any]] = []
        if role == "user" and not placed:
            content.append({"type": "image"})
            placed = True
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


def render_prompt(processor: Any, record: PreferenceRecord) -> str:
    """The prompt text ``encode_example`` is given for ``record``: its prompt as it is when single-turn;
    a conversation rendered with the chat template, ``<image>`` included, when it has history."""
    if not record.history:
        return record.prompt
    from misp.models.llava15 import CHAT_TEMPLATE

    template = getattr(processor, "chat_template", None) or CHAT_TEMPLATE
    text = processor.apply_chat_template(
        chat_messages(record.history, record.prompt), chat_template=template, add_generation_prompt=True, tokenize=False
    )
    image_token = getattr(processor, "image_token", "<image>")
    if image_token != "<image>":
        # encode_example expands the literal placeholder, whatever the tokenizer calls its image token.
        text = text.replace(image_token, "<image>")
    return text.rstrip()


def rendered(processor: Any, read: ReadResult) -> ReadResult:
    """``read`` with every conversation's prompt rendered (records with no history unchanged)."""
    if not any(getattr(r, "history", ()) for r in read.records):
        return read
    records = [replace(r, prompt=render_prompt(processor, r), history=()) if r.history else r for r in read.records]
    return replace(read, records=records)
