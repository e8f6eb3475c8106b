"""The rule for special-token strings inside data text (prompts and responses).

A tokenizer turns the *string* of a special token (``</s>``, ``<s>``, ``<image>``, ``<pad>``) into that
token wherever it appears, so a literal ``</s>`` inside a response would end the sequence in the labels,
and the model would learn to stop there. misp therefore **refuses** a prompt or response that contains
any special-token string of the model's tokenizer as text, except the one ``<image>`` placeholder a
prompt may hold. The refusal is a ``ValueError`` beginning with "the prompt" or "the response", which
the readers turn into a record error naming file, line, field and record id (skipped with the other bad
records under ``on_bad_record: skip``), so nothing changes meaning silently and nothing is lost.
"""

from __future__ import annotations

from typing import Any


def special_token_strings(tokenizer: Any) -> list[str]:
    """Every special-token string of ``tokenizer``, longest first (so ``</s>`` is named, not ``s>``)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return sorted((t for t in tokens if t), key=lambda t: (-len(t), t))


def refuse_special_tokens(tokenizer: Any, text: str, what: str, allowed: str | None = None) -> None:
    """Raise ``ValueError("<what> contains the special token ...")`` if ``text`` holds one as text.

    Args:
        tokenizer: the model's tokenizer (its special tokens are the ones that matter).
        text: a prompt or a response, as the data file holds it.
        what: ``"the prompt"`` or ``"the response"`` (the start of the message, which names the field).
        allowed: a special-token string allowed once (the prompt's ``<image>`` placeholder).
    """
    if allowed:
        text = text.replace(allowed, "", 1)
    for token in special_token_strings(tokenizer):
        if token in text:
            at = text.index(token)
            raise ValueError(
                f"{what} contains the special token {token!r} as text (at character {at}: "
                f"{text[max(0, at - 20): at + len(token) + 20]!r}); the tokenizer would read it as the token "
                "itself, so misp refuses it: remove or rewrite it in the data"
            )
