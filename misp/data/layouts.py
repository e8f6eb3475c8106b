"""Conversations and ratings in published preference sets, turned into misp's fields.

A record's prompt may be a conversation (a list of messages); its responses may be a message or a list
of messages. Messages are ``{"role", "content"}`` (TRL, ms-swift, OpenAI style; ``content`` a string or a
list of ``{"type": "text"|"image", ...}`` parts) or ``{"from", "value"}`` (ShareGPT, LLaMA-Factory, LLaVA).
Roles ``human``/``user``, ``gpt``/``assistant``/``model`` and ``system`` are understood. ``<image>``
placeholders are removed from the text: misp places the record's one image itself, in the first user
turn, where the model's chat template puts it.

Only the last assistant turn is scored: a prompt conversation must end with a user turn (everything
before it is context, rendered with the chat template), and a conversation that carries the answer too
(ms-swift's ``messages``) must end with an assistant turn, which is the chosen response.

VLFeedback rows hold several rated completions instead of a pair; :class:`RatingRule` says how they
become one pair.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

IMAGE_PLACEHOLDER = "<image>"

_ROLES = {
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "system": "system",
}

Turn = tuple[str, str]
"""One message: (role, text), role one of "system", "user", "assistant"."""


class FieldError(Exception):
    """A field of a row is invalid; the reader adds the file (or dataset, split) and line (or row)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Conversation:
    """A prompt given as messages: the context turns, then the final user turn's text."""

    history: tuple[Turn, ...]
    prompt: str


def _type_name(value: Any) -> str:
    names = {str: "string", int: "integer", float: "number", list: "list", dict: "object", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def as_rows(value: Any) -> Any:
    """A list of structs as a list of dicts, also when ``datasets`` gives it column-wise (a dict of lists)."""
    if isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            n = lengths.pop()
            return [{k: v[i] for k, v in value.items()} for i in range(n)]
    return value


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                kind = part.get("type", "text" if part.get("text") is not None else None)
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise FieldError(where, f"part {j}: a text part without a string 'text'")
                    parts.append(part["text"])
                elif kind not in ("image", "image_url"):
                    raise FieldError(where, f"part {j}: unknown content type {kind!r} (text or image)")
            else:
                raise FieldError(where, f"part {j}: expected an object, got {_type_name(part)}")
        text = "\n".join(parts)
    else:
        raise FieldError(where, f"expected text or a list of content parts, got {_type_name(content)}")
    return text.replace(IMAGE_PLACEHOLDER, "").strip()


def message(value: Any, where: str) -> Turn:
    """One message as (role, text)."""
    if not isinstance(value, dict):
        raise FieldError(where, f"expected a message object, got {_type_name(value)}")
    if "role" in value or "content" in value:
        role, content = value.get("role"), value.get("content")
    elif "from" in value or "value" in value:
        role, content = value.get("from"), value.get("value")
    else:
        raise FieldError(where, f"a message needs role/content or from/value keys, got {sorted(value)}")
    norm = _ROLES.get(str(role).strip().lower()) if isinstance(role, str) else None
    if norm is None:
        raise FieldError(where, f"unknown role {role!r} (user/human, assistant/gpt, system)")
    return norm, _content_text(content, where)


def messages(value: Any, where: str) -> list[Turn]:
    """A conversation as a list of (role, text); empty texts and empty lists are errors."""
    value = as_rows(value)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise FieldError(where, f"expected a list of messages, got {_type_name(value)}")
    if not value:
        raise FieldError(where, "empty conversation")
    out = []
    for i, item in enumerate(value):
        try:
            role, text = message(item, where)
        except FieldError as e:
            raise FieldError(where, f"message {i}: {e.reason}") from None
        if not text and role != "system":
            raise FieldError(where, f"message {i} ({role}) has no text")
        out.append((role, text))
    return out


def prompt_conversation(value: Any, where: str) -> Conversation:
    """A prompt conversation: it must end with a user turn (the answer to it is what is scored)."""
    turns = messages(value, where)
    role, text = turns[-1]
    if role != "user":
        raise FieldError(
            where, f"the conversation ends with a {role} turn; a prompt must end with the user turn being answered"
        )
    return Conversation(history=tuple(turns[:-1]), prompt=text)


def answered_conversation(value: Any, where: str) -> tuple[Conversation, str]:
    """A conversation that carries its answer: (the prompt conversation, the last assistant turn's text)."""
    turns = messages(value, where)
    role, answer = turns[-1]
    if role != "assistant":
        raise FieldError(where, f"the conversation does not end with an assistant turn (it ends with {role}): nothing to score")
    if len(turns) < 2:
        raise FieldError(where, "the conversation has no user turn before its answer")
    return prompt_conversation([{"role": r, "content": t} for r, t in turns[:-1]], where), answer


def response_text(value: Any, where: str) -> str:
    """A response given as text, as one message, or as a list of messages (its last, an assistant turn)."""
    if isinstance(value, str):
        text = value.replace(IMAGE_PLACEHOLDER, "").strip() if IMAGE_PLACEHOLDER in value else value
        if not text.strip():
            raise FieldError(where, "empty string")
        return text
    turns = messages(value, where)
    role, text = turns[-1]
    if role != "assistant":
        raise FieldError(where, f"the response does not end with an assistant turn (it ends with {role})")
    return text


# ---------------------------------------------------------------------------------------------------
# VLFeedback ratings


@dataclass(frozen=True)
class RatingRule:
    """How a VLFeedback row's rated completions become one (chosen, rejected) pair.

    Each completion's score is the mean of its ratings over ``aspects`` (a completion missing one of them,
    or rated "N/A", is left out). The best-scored completion is chosen (the first on a tie); the rejected
    one is drawn among those scored at least ``min_gap`` below it. A row with no such pair is a bad record
    (skipped, and counted, under ``on_bad_record: skip``).
    """

    aspects: tuple[str, ...] = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
    """The annotation aspects averaged into a completion's score (VLFeedback rates each from 1 to 5)."""
    min_gap: float = 1.0
    """The smallest score difference between chosen and rejected; pairs closer than this carry little signal."""
    rejected: Literal["lowest", "random"] = "lowest"
    """Which completion below the gap is rejected: the lowest-scored (the first on a tie), or one drawn
    uniformly, seeded by the row's id, so that every run draws the same."""

    def __post_init__(self) -> None:
        if not self.aspects:
            raise ValueError("ratings.aspects must name at least one aspect")
        if self.min_gap < 0:
            raise ValueError(f"ratings.min_gap must be >= 0, got {self.min_gap}")
        if self.rejected not in ("lowest", "random"):
            raise ValueError(f"ratings.rejected must be 'lowest' or 'random', got {self.rejected!r}")


def _rating(annotations: Any, aspect: str) -> float | None:
    if not isinstance(annotations, Mapping):
        return None
    entry = annotations.get(aspect)
    value = entry.get("Rating") if isinstance(entry, Mapping) else entry
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def rated_pair(completions: Any, rule: RatingRule, seed: str, where: str) -> tuple[dict, dict]:
    """(chosen, rejected) completions of a VLFeedback row by ``rule``, each with its ``score``."""
    items = as_rows(completions)
    if not isinstance(items, list):
        raise FieldError(where, f"expected a list of completions, got {_type_name(items)}")
    scored = []
    for i, c in enumerate(items):
        if not isinstance(c, Mapping) or not isinstance(c.get("response"), str) or not c["response"].strip():
            continue
        ratings = [_rating(c.get("annotations"), a) for a in rule.aspects]
        if any(r is None for r in ratings):
            continue
        scored.append({"index": i, "model": c.get("model"), "response": c["response"], "score": sum(ratings) / len(ratings)})
    if len(scored) < 2:
        raise FieldError(where, f"the rating rule yields no pair: {len(scored)} of {len(items)} completions rated on {list(rule.aspects)}")
    best = max(scored, key=lambda c: c["score"])  # max keeps the first on a tie
    below = [c for c in scored if c["score"] <= best["score"] - rule.min_gap and c["response"].strip() != best["response"].strip()]
    if not below:
        worst = min(c["score"] for c in scored)
        raise FieldError(
            where, f"the rating rule yields no pair: scores {worst:g}..{best['score']:g} are within min_gap={rule.min_gap:g}"
        )
    if rule.rejected == "lowest":
        rejected = min(below, key=lambda c: c["score"])
    else:
        rejected = random.Random(seed).choice(below)
    return best, rejected


# ---------------------------------------------------------------------------------------------------
# Row preparation for layouts whose columns are not one misp field each


@dataclass(frozen=True)
class LayoutOptions:
    """What a layout's row preparation may need beyond the row."""

    ratings: RatingRule = field(default_factory=RatingRule)


def _get(row: Mapping[str, Any], key: str, required: bool = True) -> Any:
    value = row.get(key)
    if value is None and required:
        raise FieldError(key, "missing required field" if key not in row else "required field is null")
    return value


def prepare_swift(row: Mapping[str, Any], keys: Mapping[str, str], index: int, options: LayoutOptions) -> dict:
    """ms-swift: ``messages`` ending with the chosen assistant turn, ``rejected_response``, ``images``,
    and ``rejected_images``: the image the rejected side is paired with, misp's given negative."""
    where = keys["messages"]
    conversation, chosen = answered_conversation(_get(row, where), where)
    out = {
        "prompt": conversation,
        "chosen": chosen,
        "rejected": _get(row, keys["rejected"]),
        "image": _get(row, keys["image"]),
        "negatives": row.get(keys["negatives"]),
    }
    if keys.get("id") in row:
        out["id"] = row[keys["id"]]
    return out


def prepare_vlfeedback(row: Mapping[str, Any], keys: Mapping[str, str], index: int, options: LayoutOptions) -> dict:
    """VLFeedback: ``prompt``, ``img_path`` and rated ``completions``, paired by ``options.ratings``."""
    rid = _get(row, keys["id"])
    chosen, rejected = rated_pair(_get(row, keys["completions"]), options.ratings, str(rid), keys["completions"])
    return {
        "id": rid,
        "image": _get(row, keys["image"]),
        "prompt": _get(row, keys["prompt"]),
        "chosen": chosen["response"],
        "rejected": rejected["response"],
        "meta": {
            "chosen_model": chosen["model"], "chosen_score": chosen["score"],
            "rejected_model": rejected["model"], "rejected_score": rejected["score"],
        },
    }


def single(value: Any, where: str) -> Any:
    """The one item of a one-item list (the ``images`` column of a single-image record); other values as they are."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise FieldError(where, f"{len(value)} images; a misp record has exactly one" if value else "no image")
        return value[0]
    return value


__all__ = [
    "Conversation", "FieldError", "LayoutOptions", "RatingRule", "Turn", "answered_conversation", "as_rows",
    "message", "messages", "prepare_swift", "prepare_vlfeedback", "prompt_conversation", "rated_pair",
    "response_text", "single",
]
