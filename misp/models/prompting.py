"""Prompt templating, tokenisation with supervised-token labels, collation and image tensors, for every
model family (``misp.models.families``), in training and evaluation alike.

The family of the processor templates the prompt (LLaVA-1.5: ``USER: <image>\n... ASSISTANT:``; others:
the processor's own chat template, with its default system message), re-templating prompts written for
another family. ``encode_example`` then tokenises as the processor's ``__call__`` does, so the prompt ids
match what ``processor(images=..., text=...)`` returns and generation sees the same prompt as training. A
family whose image token count is fixed (LLaVA) gets the image placeholder expanded here; one whose count
depends on the image keeps one placeholder, expanded in the forward once the batch's images are known
(``misp.models.forward.expand_image_rows``). The supervised tokens start exactly where the prompt's ids end.
"""

from __future__ import annotations

import logging
import weakref
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import ProcessorMixin

from misp.batch import ImageInputs
from misp.models.families import family_for_processor
from misp.models.families.base import IMAGE_MARKER
from misp.models.families.llava import PROMPT_TEMPLATE, Llava15Family  # noqa: F401  (PROMPT_TEMPLATE: re-exported)
from misp.utils.text import refuse_special_tokens

IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt, image and padding tokens)."""

log = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 1024
"""Distinct templated prompts whose token ids ``encode_example`` keeps per tokenizer (0: no cache).

Datasets repeat few prompts ("describe the image.", a few question forms: 16 across the Shapes world's
10 034 SFT examples), and a prompt is the longer half of an example's text (64 image tokens in the tiny
model, 576 in LLaVA-1.5), so tokenising each distinct one once saves about a third of the datamodules'
setup. Ids are kept as int64 arrays: 1024 LLaVA-1.5 prompts of ~600 tokens take about 5 MB."""

# tokenizer -> {(templated prompt, len(tokenizer)): ids}. Weak keys, so that a tokenizer's cache goes with it.
_PROMPT_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clear_prompt_cache() -> None:
    """Forget every cached prompt's ids (``encode_example`` tokenises each prompt again)."""
    _PROMPT_IDS.clear()


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=True)["input_ids"]``, computed once per distinct ``text``.

    The key holds ``len(tokenizer)`` beside the text, so that a token added to the tokenizer (as misp adds
    ``<image>``) after a prompt was cached makes it tokenise again rather than reuse stale ids. A fresh list
    is returned each time: callers extend it.
    """
    if PROMPT_CACHE_SIZE <= 0:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    try:
        cache = _PROMPT_IDS.get(tokenizer)
        if cache is None:
            cache = _PROMPT_IDS[tokenizer] = OrderedDict()
    except TypeError:  # a tokenizer that cannot be hashed or weakly referenced: no cache, same ids
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    key = (text, len(tokenizer))
    ids = cache.get(key)
    if ids is None:
        ids = array("q", tokenizer(text, add_special_tokens=True)["input_ids"])
        cache[key] = ids
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return ids.tolist()


def format_prompt(
    prompt: str, processor: ProcessorMixin | None = None, history: Sequence[tuple[str, str]] = ()
) -> str:
    """``prompt`` templated for the family of ``processor`` (LLaVA-1.5's ``"USER: <image>\\n{prompt}
    ASSISTANT:"`` when None), after a conversation's earlier ``(role, text)`` turns when ``history`` holds any.

    A prompt already templated for the same family is kept verbatim: public preference files (mDPO's among
    them) store the full conversation prompt, and wrapping it again would put two images and two turns in
    front of the response. One templated for another family is re-templated for this one.
    """
    family = Llava15Family() if processor is None else family_for_processor(processor)
    return family.format_prompt(processor, prompt, history)


def num_image_tokens(processor: ProcessorMixin) -> int:
    """How many ``<image>`` tokens the processor puts in place of one ``<image>`` (576 for LLaVA-1.5-7B).

    The same arithmetic as ``LlavaProcessor``: patches of the cropped image, plus the backbone's extra
    tokens (CLS), minus one under the 'default' feature strategy (which drops CLS). Families whose count
    depends on the image (Qwen2.5-VL) have none: :func:`prepare_images` gives each image's.
    """
    family = family_for_processor(processor)
    n = family.fixed_image_tokens(processor)
    if n is None:
        raise ValueError(f"a {family.name} image's token count depends on its size; prepare_images gives each image's")
    return n


def image_token_count(processor: ProcessorMixin, image: str | Path | Image.Image | tuple[int, int]) -> int:
    """How many image tokens the processor will give ``image`` (a file, read up to its header only; a PIL
    image; or a ``(width, height)`` size): the fixed count of a fixed-count family, else the count the
    image's size gives under the processor's ``min_pixels`` / ``max_pixels``."""
    family = family_for_processor(processor)
    fixed = family.fixed_image_tokens(processor)
    if fixed is not None:
        return fixed
    if isinstance(image, Image.Image):
        size = image.size
    elif isinstance(image, (str, Path)):
        with Image.open(image) as im:  # lazy: the header gives the size, no pixel is decoded
            size = im.size
    else:
        size = tuple(image)
    return family.image_tokens_for_size(processor, int(size[0]), int(size[1]))


def record_image_tokens(processor: ProcessorMixin, images) -> list[int] | None:
    """:func:`image_token_count` of each image (paths: their headers are read), or None for a fixed-count
    family, whose encoded rows hold their image tokens already."""
    if family_for_processor(processor).fixed_image_tokens(processor) is not None:
        return None
    seen: dict = {}  # records often share an image file: read each header once
    out = []
    for im in images:
        key = str(im) if isinstance(im, (str, Path)) else None
        if key is None:
            out.append(image_token_count(processor, im))
            continue
        if key not in seen:
            seen[key] = image_token_count(processor, im)
        out.append(seen[key])
    return out


def example_length(example: dict) -> int:
    """Tokens of an encoded example as the model sees it: ``input_ids`` with the one image placeholder of
    a dynamic-resolution row counted as the ``image_tokens`` it expands into (when the encoding knows them)."""
    n = example.get("images", 1)
    return len(example["input_ids"]) + example.get("image_tokens", n) - n


def _response_ids(tokenizer, prompt_text: str, prompt_ids: list[int], response: str, separator: str = " ") -> list[int]:
    # The response tokens are those of the whole text after the prompt's, as the model would produce them
    # continuing the prompt (sentencepiece tokenizers differ on a lone " word"); when the tokenizer merges
    # across the boundary, the response is tokenised alone.
    full = list(tokenizer(f"{prompt_text}{separator}{response}", add_special_tokens=True)["input_ids"])
    if full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids) :]
    return list(tokenizer(separator + response, add_special_tokens=False)["input_ids"])


def encode_example(
    processor: ProcessorMixin,
    prompt: str,
    response: str | None = None,
    max_length: int | None = None,
    image_tokens: int | Sequence[int] | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> dict[str, list[int]]:
    """Token ids and labels of one (prompt, response) example in the template of the processor's family.

    Args:
        processor: the model's processor (tokenizer plus image-token arithmetic), of a registered family.
        prompt: the user's text, without the template and without ``<image>`` (or templated for any
            known family: then it is re-templated, see :func:`format_prompt`). Families that take several
            images (``ModelFamily.max_images``) accept several ``<image>`` markers, each image placed where
            its marker is; the batch then gives each row's images in order (``vlm_logits``'s ``image_index``).
        response: the assistant's answer; ``None`` encodes the prompt alone, ready for generation.
        max_length: longest total length, image tokens included. The response (with its EOS) is cut from
            the right to fit; image and prompt tokens are never cut, so a prompt that leaves no room raises.
        image_tokens: for a family whose image token count depends on the image (dynamic resolution), the
            count this example's image takes (:func:`image_token_count`; one per image for a prompt of
            several): the row keeps one placeholder per image, but ``max_length`` counts these. None counts
            each placeholder as one token. Ignored by fixed-count families (their rows hold their image tokens).
        history: the earlier turns of a conversation, ``(role, text)`` pairs, rendered before ``prompt`` by
            the family's chat template (the image in the first user turn); only ``response`` is scored.

    Returns:
        ``{"input_ids", "labels"}``: ``input_ids`` = BOS (where the tokenizer has one), the template with
        the image placeholder (expanded for a fixed-count family), then the response and EOS; ``labels`` = -100 on every prompt and image token, the token id on each
        response token and on EOS (all -100 when ``response`` is None). With ``image_tokens`` for a
        dynamic-resolution family also ``"image_tokens"`` (see :func:`example_length`).
    """
    tokenizer = processor.tokenizer
    family = family_for_processor(processor)
    image_token = family.image_token(processor)
    n_images = max(prompt.count(IMAGE_MARKER), 1)
    family.check_image_count(n_images)
    if image_token != IMAGE_MARKER and prompt.count(image_token) > 1:
        raise ValueError(f"the prompt contains {image_token!r} {prompt.count(image_token)} times; mark several "
                         f"images with {IMAGE_MARKER!r}, where each goes")
    for marker in {image_token, IMAGE_MARKER}:
        if response is not None and marker in response:
            raise ValueError(f"the response contains {marker!r}; only the prompt holds the image")
    # Special-token strings inside data text are refused (misp.utils.text's rule), never tokenised as tokens;
    # checked on the data's own text, before any template adds the family's special tokens.
    refuse_special_tokens(tokenizer, prompt, "the prompt", allowed=image_token if image_token in prompt else "<image>")
    if response is not None:
        refuse_special_tokens(tokenizer, response, "the response")
    for role, turn in history:
        for marker in {image_token, "<image>"}:
            if marker in turn:
                raise ValueError(f"the prompt's earlier {role} turn contains {marker!r}; the image goes in the first user turn")
        refuse_special_tokens(tokenizer, turn, f"the prompt's earlier {role} turn")
    text = family.format_prompt(processor, prompt, history)
    fixed = family.fixed_image_tokens(processor)
    if fixed is not None:
        text = family.expand_image_text(processor, text)
    prompt_ids = _prompt_ids(tokenizer, text)
    ids = prompt_ids
    labels = [IGNORE_INDEX] * len(prompt_ids)
    # Tokens the image adds beyond its placeholder once the forward expands it (dynamic resolution only).
    if image_tokens is not None and not isinstance(image_tokens, int):
        image_tokens = sum(int(n) for n in image_tokens)  # one count per image of the prompt
    extra = 0 if fixed is not None or image_tokens is None else image_tokens - n_images
    if response is not None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; a response must end with one")
        response_ids = _response_ids(tokenizer, text, prompt_ids, response, family.response_separator) + [tokenizer.eos_token_id]
        if max_length is not None:
            room = max_length - len(prompt_ids) - extra
            if room < 1:
                raise ValueError(
                    f"the prompt alone is {len(prompt_ids) + extra} tokens ({fixed * n_images if fixed else extra + n_images} of them image "
                    f"tokens), leaving no room for the response within max_length={max_length}; raise max_length "
                    f"or shorten the prompt: {prompt[:80]!r}"
                )
            response_ids = response_ids[:room]
        ids = prompt_ids + response_ids
        labels = labels + response_ids
    elif max_length is not None and len(prompt_ids) + extra > max_length:
        raise ValueError(
            f"the prompt alone is {len(prompt_ids) + extra} tokens, over max_length={max_length}; image tokens are "
            f"never truncated: {prompt[:80]!r}"
        )
    out = {"input_ids": ids, "labels": labels}
    if fixed is None and image_tokens is not None:
        out["image_tokens"] = int(image_tokens)
        if n_images > 1:
            out["images"] = n_images
    return out


def encode_preference_records(
    processor: ProcessorMixin,
    records,
    max_length: int,
    truncation: str = "skip",
    source: str | None = None,
    encoded: list[tuple[dict, dict]] | None = None,
    image_tokens: list[int] | None = None,
) -> list[tuple[dict, dict] | None]:
    """Encode each record's (chosen, rejected) examples; None for a record left out by ``truncation``.

    A pair is judged as one: when either example is longer than ``max_length``, ``skip`` leaves the record
    out (with one warning that counts them), ``truncate`` cuts both responses to fit (cut responses keep
    no EOS: they are unfinished), and ``raise`` stops with the record's id. Cutting only the longer one
    silently, as a per-example limit would, trains on a pair whose rejected answer merely ends early.
    ``encoded`` holds the records' pairs already encoded without a limit (the datamodule's validation
    pass made them); only pairs that must be cut are tokenised again. ``image_tokens`` holds each record's
    image token count for a dynamic-resolution family (:func:`record_image_tokens`), so that the length
    judged is the one the model sees; the encodings (those in ``encoded`` too) then carry it.
    """
    if truncation not in ("skip", "truncate", "raise"):
        raise ValueError(f"truncation must be skip, truncate or raise, got {truncation!r}")
    out: list[tuple[dict, dict] | None] = []
    over: list[str] = []
    if image_tokens is not None and len(image_tokens) != len(records):
        raise ValueError(f"{len(image_tokens)} image token counts for {len(records)} records")
    for i, r in enumerate(records):
        n_image = image_tokens[i] if image_tokens is not None else None
        pair = encoded[i] if encoded is not None else tuple(
            encode_example(processor, r.prompt, y, image_tokens=n_image) for y in (r.chosen, r.rejected)
        )
        if n_image is not None:
            for e in pair:
                e["image_tokens"] = int(n_image)
        longest = max(example_length(e) for e in pair)
        if longest <= max_length:
            out.append(pair)
            continue
        over.append(r.id)
        if truncation == "raise":
            raise ValueError(
                f"{source or 'records'}: record {r.id!r} is {longest} tokens with its image, over max_length="
                f"{max_length}; raise max_length, or set truncation to skip or truncate"
            )
        if truncation == "skip":
            out.append(None)
        else:
            try:
                out.append(tuple(encode_example(processor, r.prompt, y, max_length, n_image) for y in (r.chosen, r.rejected)))
            except ValueError as e:  # the prompt with its image leaves no room: name the record
                raise ValueError(f"{source or 'records'}: record {r.id!r}: {e}") from None
    if over:
        action = "left out" if truncation == "skip" else "truncated"
        log.warning(
            "%s: %d of %d records are longer than max_length=%d and were %s (e.g. %s)",
            source or "records", len(over), len(records), max_length, action, ", ".join(over[:3]),
        )
        if truncation == "skip" and len(over) == len(records):
            raise ValueError(f"{source or 'records'}: every record is longer than max_length={max_length}")
    return out


def collate_examples(
    examples: list[dict], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors ``[B, T]``.

    Args:
        examples: outputs of ``encode_example``.
        pad_token_id: id written into padding positions of ``input_ids``.
        padding_side: ``right`` for training, ``left`` for batched generation.
    """
    if not examples:
        raise ValueError("collate_examples needs at least one example")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; the tokenizer needs a pad token")
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        lab = e.get("labels", [IGNORE_INDEX] * n)
        if len(lab) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(lab)} labels")
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, cols] = 1
        labels[i, cols] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prepare_images(processor: ProcessorMixin, images: list[Image.Image]) -> ImageInputs:
    """The U images as the processor's family prepares them (its tensors and each image's token count)."""
    return family_for_processor(processor).prepare_images(processor, images)


def preprocess_images(processor: ProcessorMixin, images: list[Image.Image]) -> torch.Tensor:
    """The processor's pixel values ``[N, 3, H, W]`` for PIL images (converted to RGB first)."""
    if not images:
        raise ValueError("preprocess_images needs at least one image")
    rgb = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
    return processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
