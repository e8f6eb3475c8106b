"""Record files and datasets: reading and validating every example misp trains or evaluates on.

One table-driven reader, :func:`read_records`, reads every kind of record (:data:`RECORD_KINDS`: a
schema, a record class, its layouts and a whole-record check); ``read_preference_records`` and the
other ``read_*`` names are that reader for one kind. It takes a JSON Lines file (one object a line,
split on ``"\n"`` only; blank lines are ignored) or a ``.json``-style file holding one JSON array of
objects (mDPO ships that); the two are told apart by the first non-blank character, not by the suffix,
because the official POPE files are JSON Lines named ``.json``. In error messages LINE is the 1-based
line for JSON Lines and the 1-based item index for an array. It also takes a dataset as published (a
parquet or arrow file, a dataset folder, a hub id; ``misp.data.record_source``), whose errors name the
dataset, split and 0-based row, and whose embedded images are stored once each by content
(``misp.data.image_store``).

Everything is validated up front, images included (opened and decoded once each), so a bad record fails
the run at start-up with ``FILE:LINE: field 'FIELD': REASON`` instead of hours later inside a worker.
With ``on_bad_record="skip"`` bad records are dropped, counted in :attr:`ReadResult.skipped` and
summarised in one warning; a file whose records are all bad still raises.

Image paths are taken as given when absolute, else relative to ``image_root`` when given, else to the
record file's folder. They are made absolute and normalised without following symlinks (so an image
in a Hugging Face cache keeps its own file name).

Layouts of preference files (source key for each misp field; ``a.b`` means key ``b`` of the object,
or of the JSON string holding an object, found at key ``a``):

======  =========  ==========  =============  ===========  =============  =========  ======
layout  id         image       prompt         chosen       rejected       negatives  meta
======  =========  ==========  =============  ===========  =============  =========  ======
misp    id         image       prompt         chosen       rejected       negatives  meta
mdpo    (index)    img_path    prompt         chosen       rejected       (none)     (none)
rlhfv   idx        image (*)   text.question  text.chosen  text.rejected  (none)     (none)
======  =========  ==========  =============  ===========  =============  =========  ======

- ``misp``: the native format of architecture.md ("Files").
- ``mdpo``: mDPO's released data (``data/sample_data.json`` of luka-group/mDPO, derived from VLFeedback):
  a JSON array of ``{"img_path", "prompt", "chosen", "rejected"}`` with no id, so the id is the 0-based
  position of the record in the file. Its prompts carry the chat template and ``<image>`` token
  verbatim.
- ``rlhfv``: rows of openbmb/RLHF-V-Dataset, or exported to JSON Lines: ``idx`` (an integer), the
  embedded ``image`` (*: else ``image_path``, which exports carry alone), and ``text``, a JSON string
  holding ``question``, ``chosen`` and ``rejected``. An unparsable ``text`` is reported as field ``text``.
- ``rlaifv``, ``trl``, ``sharegpt``, ``povid``, ``swift``, ``vlfeedback``: the published sets of
  docs/data.md (its table lists their columns). A prompt may be a conversation and a response a message
  or messages (``misp.data.layouts``); a record with a conversation keeps its earlier turns in
  ``PreferenceRecord.history``.

POPE question files have the layouts ``misp`` (``id`` optional, ``image``, ``question``, ``label``,
``split``) and ``pope``, the official RUCAIBox/POPE files (``question_id`` -> id, ``text`` -> question;
they hold one split each, so pass ``split=``). Caption, SFT and prompt files use their native keys. In
every reader ``key_map`` (misp field -> source key) overrides the layout's keys, and the id falls back
to the record's 0-based position where a format makes it optional.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image as PILImage
from tqdm.auto import tqdm

from misp.data.image_store import ImageStore, image_bytes
from misp.data.layouts import (
    Conversation,
    FieldError,
    LayoutOptions,
    RatingRule,
    prepare_swift,
    prepare_vlfeedback,
    prompt_conversation,
    response_text,
)
from misp.data.record_source import DatasetRows, is_dataset_source, jsonl_lines, open_dataset
from misp.errors import UserError
from misp.images import verify_image

logger = logging.getLogger(__name__)

OnBadRecord = Literal["raise", "skip"]


class RecordError(UserError, ValueError):
    """A record file, or one record in it, is invalid.

    A record file's errors read ``FILE:LINE: field 'FIELD': REASON``; a dataset's read
    ``DATASET [split SPLIT] row ROW: field 'COLUMN': REASON`` (ROW 0-based, as ``dataset[ROW]``).

    Attributes:
        file: The record file, or the dataset as given (a path or a hub id).
        line: 1-based line (JSON Lines) or item index (JSON array), or the 0-based row of a dataset;
            None for whole-file errors.
        field: The offending key as written in the file (dotted for nested keys), or the dataset column;
            None for whole-record or whole-file errors.
        reason: What is wrong.
        split: The dataset split; None for a record file.
    """

    def __init__(
        self, file: str | os.PathLike, line: int | None, field: str | None, reason: str, split: str | None = None
    ):
        self.file = Path(file)
        self.line = line
        self.field = field
        self.reason = reason
        self.split = split
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.split is not None:
            where = f"{self.file} [split {self.split}]" + (f" row {self.line}" if self.line is not None else "")
        else:
            where = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}"
        what = f"field '{self.field}': " if self.field is not None else ""
        return f"{where}: {what}{self.reason}"

    def __reduce__(self):
        # Exceptions cross process boundaries (dataloader workers, spawn); rebuild from the attributes.
        return (type(self), (self.file, self.line, self.field, self.reason, self.split))


@dataclass(frozen=True)
class EditedImage:
    """A negative image with its own correct response: an edit of the positive and what is true of it."""

    image: Path
    """The edited image, absolute."""
    response: str
    """Its own correct response to the record's prompt (e.g. its caption)."""
    target: bool = False
    """Whether the edit changes the object the record is about (e.g. inserts or removes the object a model
    hallucinates): the ``sae_targets`` source keeps such edits among the selected negatives and draws one
    every epoch."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference example: an image, a prompt and a chosen/rejected response pair."""

    id: str
    """Unique within the file; seeds per-example sampling and keys the caches."""
    image: Path
    """The positive image, absolute."""
    prompt: str
    """The user prompt, verbatim (in a conversation: the last user turn, the one the responses answer)."""
    chosen: str
    """The preferred response."""
    rejected: str
    """The dispreferred response."""
    negatives: tuple[Path, ...] = ()
    """Optional fixed negative images for this example, absolute."""
    meta: dict = field(default_factory=dict)
    """Free-form metadata carried through untouched."""
    history: tuple[tuple[str, str], ...] = ()
    """The turns before ``prompt`` when the prompt is a conversation, as (role, text) with role "system",
    "user" or "assistant"; rendered with the model family's chat template (``ModelFamily.format_prompt``). Empty
    for a single-turn record, which is encoded exactly as before."""
    edits: tuple[EditedImage, ...] = ()
    """Optional negative images each with its own correct response (the ``edits`` source's response pairs;
    docs/data.md). Empty unless the record carries an ``edits`` list."""


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE yes/no question about an image."""

    id: str
    """Unique within the file."""
    image: Path
    """The image asked about, absolute."""
    question: str
    """The question, e.g. "Is there a dog in the image?"."""
    label: str
    """The true answer, "yes" or "no"."""
    split: str
    """The POPE split: "random", "popular" or "adversarial" (any non-empty name is accepted)."""
    meta: dict = field(default_factory=dict)
    """Free-form metadata carried through untouched."""


@dataclass(frozen=True)
class CaptionRecord:
    """An image with a reference caption (CLIP training, retrieval pools)."""

    id: str
    """Unique within the file."""
    image: Path
    """The image, absolute."""
    caption: str
    """Its caption."""


@dataclass(frozen=True)
class SFTRecord:
    """One supervised fine-tuning example."""

    id: str
    """Unique within the file."""
    image: Path
    """The image, absolute."""
    prompt: str
    """The user prompt."""
    response: str
    """The target response."""


@dataclass(frozen=True)
class PromptRecord:
    """A captioning test prompt with the image's ground-truth objects (for CHAIR)."""

    id: str
    """Unique within the file."""
    image: Path
    """The image, absolute."""
    prompt: str
    """The prompt to generate a response for."""
    objects: tuple[str, ...]
    """Ground-truth object names present in the image (may be empty)."""


@dataclass(frozen=True)
class MMVPPair:
    """A Shapes-MMVP pair: two images that differ in one attribute and a question they answer differently."""

    id: str
    """Unique within the file."""
    image_a: Path
    """The first image (a test image), absolute."""
    image_b: Path
    """The second image (its one-attribute counterfactual), absolute."""
    question: str
    """The question asked about both images."""
    answer_a: str
    """The true answer for ``image_a``: "yes" or "no"."""
    answer_b: str
    """The true answer for ``image_b``: "yes" or "no", the other one."""
    attribute: str
    """What the two images differ in (color, shape, size or position): the per-attribute key."""


@dataclass(frozen=True)
class GroundingRecord:
    """A caption with its image and one-attribute counterfactual images (likelihood grounding)."""

    id: str
    """Unique within the file."""
    image: Path
    """The image the caption describes, absolute."""
    prompt: str
    """The captioning prompt."""
    caption: str
    """The image's true caption, scored under the image and under each counterfactual."""
    counterfactuals: tuple[Path, ...]
    """Images that each change one attribute of one object, absolute."""
    attributes: tuple[str, ...]
    """The attribute each counterfactual changes, one per counterfactual."""


@dataclass
class ReadResult:
    """The valid records of a file, and the errors of the ones skipped."""

    records: list
    """Valid records in file order."""
    skipped: list[RecordError]
    """One error per skipped record (empty unless ``on_bad_record="skip"``)."""
    path: Path
    """The file read."""
    lines: list[int] = field(default_factory=list)
    """The 1-based line (JSON Lines) or item index (JSON array) of each record in ``records`` (a
    dataset's 0-based row), so that a later check of a record (its tokenised length, say) can name
    where it is."""
    split: str | None = None
    """The dataset split read; None for a record file (errors about a record pass it to RecordError)."""
    rows: int = 0
    """Rows (lines, items) read, valid or not."""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator:
        return iter(self.records)


# ---------------------------------------------------------------------------------------------------
# The schema-driven validator


class _Invalid(Exception):
    """A value failed a converter's check; the validator adds file, line and field."""


_FieldError = FieldError


@dataclass
class _Context:
    """Per-file state the converters need."""

    base: Path
    verify: bool
    verified: dict[Path, str | None]
    index: int = 0
    store: ImageStore | None = None
    """Where embedded images are written (None: a record with one is an error)."""


@dataclass(frozen=True)
class _Field:
    name: str
    types: tuple[type, ...]
    convert: Callable[[Any, _Context], Any] | None = None
    required: bool = True
    default: Callable[[_Context], Any] | None = None
    """Value for an absent optional field; None lets the dataclass default apply."""
    expected: str | None = None
    """What a type error says is expected, where ``types`` holds forms too many to list (a response may be
    a string, a message or messages, but a number is best answered with "expected string")."""


@dataclass(frozen=True)
class _Layout:
    keys: Mapping[str, str] = field(default_factory=dict)
    """misp field (or a name the layout's ``prepare`` reads) -> source key, for those whose key differs
    from the name."""
    id_from_index: bool = False
    """The format has no id: use the record's 0-based position."""
    prepare: Callable[[Mapping[str, Any], Mapping[str, str], int, LayoutOptions], dict] | None = None
    """Builds the misp fields from a row whose columns are not one field each (a conversation that holds
    the answer, rated completions); ``keys`` still names the columns, in errors too."""
    required: tuple[str, ...] = ()
    """With ``prepare``: the names (resolved through ``keys``) of the columns every row needs."""
    alternatives: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """misp field -> source keys tried in order when the row lacks the field's key (RLHF-V's hub rows embed
    ``image``, its JSON Lines exports name ``image_path``); a ``key_map`` entry for the field drops them."""


_MISSING = object()

_TYPE_NAMES = {str: "string", int: "integer", float: "number", list: "list", dict: "object", bool: "boolean"}


def _type_name(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    # JSON true/false load as bool, a subclass of int; an id of `true` is a mistake, not 1.
    if isinstance(value, bool) and bool not in types:
        return False
    return isinstance(value, types)


def _text(value: str, ctx: _Context) -> str:
    if not value.strip():
        raise _Invalid("empty string")
    return value


def _record_id(value: str | int, ctx: _Context) -> str:
    if isinstance(value, int):
        return str(value)
    return _text(value, ctx)


def _label(value: str, ctx: _Context) -> str:
    norm = value.strip().lower()
    if norm not in ("yes", "no"):
        raise _Invalid(f"expected 'yes' or 'no', got {value!r}")
    return norm


def _resolve(value: str, ctx: _Context) -> Path:
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = ctx.base / p
    # normpath rather than resolve(): keep symlinked files under their own names.
    return Path(os.path.normpath(p.absolute()))


def _check_image(p: Path, ctx: _Context) -> None:
    if not ctx.verify:
        return
    if p not in ctx.verified:
        ctx.verified[p] = verify_image(p)
    reason = ctx.verified[p]
    if reason is not None:
        raise _Invalid(f"{reason}: {p}")


def _image(value: Any, ctx: _Context) -> Path:
    """A path, or an embedded image (bytes, a ``{"bytes", "path"}`` struct, a PIL image) stored by content."""
    data = image_bytes(value)
    if data is not None:
        if ctx.store is None:
            raise _Invalid("an embedded image, but no image store to write it to")
        p = ctx.store.put(data)
    else:
        if isinstance(value, dict):
            value = value.get("path")
            if not isinstance(value, str):
                raise _Invalid("an image struct with neither bytes nor a path")
        if not isinstance(value, str):
            raise _Invalid(f"expected an image path or embedded image, got {_type_name(value)}")
        _text(value, ctx)
        p = _resolve(value, ctx)
    _check_image(p, ctx)
    return p


def _one_image(value: Any, ctx: _Context) -> Path:
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise _Invalid(f"{len(value)} images; a misp record has exactly one" if value else "no image")
        value = value[0]
    return _image(value, ctx)


def _image_list(value: list, ctx: _Context) -> tuple[Path, ...]:
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, (str, dict, bytes, PILImage.Image)):
            raise _Invalid(f"item {i}: expected string, got {_type_name(item)}")
        try:
            out.append(_image(item, ctx))
        except _Invalid as e:
            raise _Invalid(f"item {i}: {e}") from None
    return tuple(out)


def _edit_list(value: list, ctx: _Context) -> tuple[EditedImage, ...]:
    """``[{"image": ..., "response": ..., "target": false}, ...]``: negative images with their own correct
    responses (``target`` optional)."""
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise _Invalid(f"item {i}: expected an object with 'image' and 'response', got {_type_name(item)}")
        for key in ("image", "response"):
            if item.get(key) is None:
                raise _Invalid(f"item {i}: missing '{key}'")
        if not isinstance(item["response"], str) or not item["response"].strip():
            raise _Invalid(f"item {i}: 'response': expected a non-empty string, got {item['response']!r}")
        if not isinstance(item.get("target", False), bool):
            raise _Invalid(f"item {i}: 'target': expected true or false, got {item['target']!r}")
        try:
            image = _image(item["image"], ctx)
        except _Invalid as e:
            raise _Invalid(f"item {i}: 'image': {e}") from None
        out.append(EditedImage(image, item["response"], item.get("target", False)))
    return tuple(out)


def _prompt(value: str | list | Conversation, ctx: _Context) -> str | Conversation:
    """A prompt string, or a conversation (messages) ending with the user turn being answered."""
    if isinstance(value, str):
        return _text(value, ctx)
    try:
        conv = value if isinstance(value, Conversation) else prompt_conversation(value, "")
    except FieldError as e:
        raise _Invalid(e.reason) from None
    return conv.prompt if not conv.history else conv


def _response(value: str | dict | list, ctx: _Context) -> str:
    """A response as text, one message, or messages whose last is the assistant turn scored."""
    if isinstance(value, str):
        return _text(value, ctx)
    try:
        return response_text(value, "")
    except FieldError as e:
        raise _Invalid(e.reason) from None


def _string_list(value: list, ctx: _Context) -> tuple[str, ...]:
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise _Invalid(f"item {i}: expected a non-empty string, got {item!r}")
    return tuple(value)


def _mapping(value: dict, ctx: _Context) -> dict:
    return dict(value)


def _index_id(ctx: _Context) -> str:
    return str(ctx.index)


_ID = _Field("id", (str, int), _record_id)
_OPTIONAL_ID = _Field("id", (str, int), _record_id, required=False, default=_index_id)
_IMAGE = _Field("image", (str,), _image)
_EMBEDDED = (str, dict, bytes, PILImage.Image)
_META = _Field("meta", (dict,), _mapping, required=False)


def _text_field(name: str) -> _Field:
    return _Field(name, (str,), _text)


_PREFERENCE_SCHEMA = (
    _ID,
    _Field("image", _EMBEDDED + (list,), _one_image, expected="string"),
    _Field("prompt", (str, list, Conversation), _prompt, expected="string"),
    _Field("chosen", (str, dict, list), _response, expected="string"),
    _Field("rejected", (str, dict, list), _response, expected="string"),
    _Field("negatives", (list,), _image_list, required=False),
    _META,
    _Field("edits", (list,), _edit_list, required=False),
)
_CAPTION_SCHEMA = (_OPTIONAL_ID, _IMAGE, _text_field("caption"))
_SFT_SCHEMA = (_OPTIONAL_ID, _IMAGE, _text_field("prompt"), _text_field("response"))
_PROMPT_SCHEMA = (_OPTIONAL_ID, _IMAGE, _text_field("prompt"), _Field("objects", (list,), _string_list))

_MMVP_SCHEMA = (
    _OPTIONAL_ID,
    _Field("image_a", (str,), _image),
    _Field("image_b", (str,), _image),
    _text_field("question"),
    _Field("answer_a", (str,), _label),
    _Field("answer_b", (str,), _label),
    _text_field("attribute"),
)
_GROUNDING_SCHEMA = (
    _OPTIONAL_ID,
    _IMAGE,
    _text_field("prompt"),
    _text_field("caption"),
    _Field("counterfactuals", (list,), _image_list),
    _Field("attributes", (list,), _string_list),
)

PREFERENCE_LAYOUTS: dict[str, _Layout] = {
    "misp": _Layout(),
    "mdpo": _Layout(keys={"image": "img_path"}, id_from_index=True),
    # openbmb/RLHF-V-Dataset: the hub rows embed `image` (their `image_path` names the authors' disk); JSON
    # Lines exports carry `image_path` alone.
    "rlhfv": _Layout(
        keys={
            "id": "idx",
            "image": "image",
            "prompt": "text.question",
            "chosen": "text.chosen",
            "rejected": "text.rejected",
        },
        alternatives={"image": ("image_path",)},
    ),
    # openbmb/RLAIF-V-Dataset: its `idx` is not unique across its source sets, so the row is the id.
    "rlaifv": _Layout(keys={"prompt": "question"}, id_from_index=True),
    # TRL's preference format, standard (strings) or conversational (messages); the values say which.
    "trl": _Layout(keys={"image": "images"}, id_from_index=True, alternatives={"image": ("image",)}),
    # LLaMA-Factory's sharegpt preference format (`ranking: true`): the prompt turns, then one message each.
    "sharegpt": _Layout(
        keys={"prompt": "conversations", "image": "images"}, id_from_index=True,
        alternatives={"prompt": ("messages",), "image": ("image",)},
    ),
    # POVID's release (LLaVA's training-data layout): a LLaVA `conversations` prompt and two strings.
    "povid": _Layout(keys={"prompt": "conversations"}),
    "swift": _Layout(
        keys={"messages": "messages", "rejected": "rejected_response", "image": "images", "negatives": "rejected_images"},
        id_from_index=True,
        prepare=prepare_swift,
        required=("messages", "rejected", "image"),
    ),
    "vlfeedback": _Layout(
        keys={"image": "img_path", "completions": "completions"}, prepare=prepare_vlfeedback,
        required=("id", "image", "prompt", "completions"),
    ),
}
POPE_LAYOUTS: dict[str, _Layout] = {
    "misp": _Layout(),
    "pope": _Layout(keys={"id": "question_id", "question": "text"}),
}


def _lookup(row: Mapping[str, Any], key: str, nested: dict[str, Mapping]) -> tuple[Any, str]:
    """The value at source ``key`` of ``row`` and the key to blame if it is missing.

    A dotted key ``a.b`` reads key ``b`` of the object at ``a``; that object may be stored as a JSON
    string (RLHF-V's ``text``), parsed once per row into ``nested``.
    """
    if key in row or "." not in key:
        return row.get(key, _MISSING), key
    head, rest = key.split(".", 1)
    if head not in nested:
        if head not in row or row[head] is None:
            return _MISSING, head
        obj = row[head]
        if isinstance(obj, str):
            try:
                obj = json.loads(obj)
            except json.JSONDecodeError as e:
                raise _FieldError(head, f"invalid JSON in string field: {e}") from None
        if not isinstance(obj, dict):
            raise _FieldError(head, f"expected an object or a JSON string holding one, got {_type_name(obj)}")
        nested[head] = obj
    value, where = _lookup(nested[head], rest, {})
    return value, f"{head}.{where}"


def _validate(
    row: Any, schema: tuple[_Field, ...], keys: Mapping[str, str], layout: _Layout, ctx: _Context,
    options: LayoutOptions,
) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _FieldError(None, f"expected a JSON object, got {_type_name(row)}")
    out: dict[str, Any] = {}
    nested: dict[str, Mapping] = {}
    prepared = None
    if layout.prepare is not None:
        full = {name: keys.get(name, name) for name in {*keys, *(f.name for f in schema)}}
        prepared = layout.prepare(row, full, ctx.index, options)
    for f in schema:
        if f.name == "id" and layout.id_from_index and "id" not in keys and (prepared is None or "id" not in prepared):
            out["id"] = str(ctx.index)
            continue
        src = keys.get(f.name, f.name)
        if prepared is not None:
            value, where = prepared.get(f.name, _MISSING), src
        else:
            value, where = _lookup(row, src, nested)
            for other in layout.alternatives.get(f.name, ()) if src == layout.keys.get(f.name) else ():
                if value is not _MISSING:
                    break
                value, where = _lookup(row, other, nested)
                where = src if value is _MISSING else where
        if value is _MISSING or value is None:
            if f.required:
                tried = layout.alternatives.get(f.name, ()) if src == layout.keys.get(f.name) else ()
                also = f" (nor {', '.join(repr(t) for t in tried)})" if tried and value is _MISSING else ""
                raise _FieldError(
                    where, f"missing required field{also}" if value is _MISSING else "required field is null"
                )
            if f.default is not None:
                out[f.name] = f.default(ctx)
            continue
        if not _is_instance(value, f.types):
            expected = f.expected or " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in f.types)
            raise _FieldError(src, f"expected {expected}, got {_type_name(value)}")
        try:
            out[f.name] = f.convert(value, ctx) if f.convert is not None else value
        except _Invalid as e:
            raise _FieldError(src, str(e)) from None
    return out


def read_utf8(path: Path) -> str:
    """The text of a record file; a byte that is not UTF-8 is a RecordError naming its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Report the line and column of the bad byte, as for every other error, not its byte offset.
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise RecordError(
            path, line, None, f"not UTF-8 text: byte 0x{data[start]:02x} at column {column} ({e.reason})"
        ) from None


def _load_rows(path: Path) -> list[tuple[int, Any]]:
    """(line, parsed value or RecordError) for each record of a JSON Lines or JSON array file."""
    if not path.exists():
        raise RecordError(path, None, None, "file not found")
    if not path.is_file():
        raise RecordError(path, None, None, "not a regular file")
    text = read_utf8(path)
    stripped = text.lstrip()
    if not stripped:
        raise RecordError(path, None, None, "empty file: no records")
    if stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            # The array as a whole is unparsable, so no item index exists: report the text line.
            raise RecordError(
                path, e.lineno, None, f"invalid JSON array: {e.msg} (column {e.colno})"
            ) from None
        if not items:
            raise RecordError(path, None, None, "empty JSON array: no records")
        return [(i + 1, item) for i, item in enumerate(items)]
    rows: list[tuple[int, Any]] = []
    for lineno, line in jsonl_lines(text):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            hint = " (misp expects one JSON object per line, or a JSON array)" if lineno == 1 else ""
            rows.append((lineno, RecordError(path, lineno, None, f"invalid JSON: {e.msg}{hint}")))
    return rows


def _check_preference(values: dict[str, Any], keys: Mapping[str, str]) -> None:
    """A pair whose two responses are the same text has no preference in it: its DPO gradient is zero."""
    prompt = values["prompt"]
    if isinstance(prompt, Conversation):
        values["prompt"], values["history"] = prompt.prompt, prompt.history
    if values["chosen"].strip() == values["rejected"].strip():
        raise _FieldError(keys.get("rejected", "rejected"), "identical to 'chosen': the pair prefers nothing")


def _check_mmvp(values: dict[str, Any], keys: Mapping[str, str]) -> None:
    """A pair both of whose images have the same answer tests nothing MMVP measures."""
    if values["answer_a"] == values["answer_b"]:
        raise _FieldError(keys.get("answer_b", "answer_b"), "equals 'answer_a': the pair's answers must differ")


def _check_grounding(values: dict[str, Any], keys: Mapping[str, str]) -> None:
    """One attribute per counterfactual, and at least one counterfactual to compare with."""
    n, m = len(values["counterfactuals"]), len(values["attributes"])
    if n == 0:
        raise _FieldError(keys.get("counterfactuals", "counterfactuals"), "empty: nothing to compare with")
    if n != m:
        raise _FieldError(keys.get("attributes", "attributes"), f"{m} attributes for {n} counterfactuals (one each)")


@dataclass(frozen=True)
class RecordKind:
    """One kind of record file: its schema, its record class, its layouts and its whole-record check."""

    schema: tuple[_Field, ...]
    record_cls: type
    layouts: Mapping[str, _Layout]
    check: Callable[[dict[str, Any], Mapping[str, str]], None] | None = None


_POPE_SCHEMA = (
    _OPTIONAL_ID,
    _IMAGE,
    _text_field("question"),
    _Field("label", (str,), _label),
    _text_field("split"),
    _META,
)

RECORD_KINDS: dict[str, RecordKind] = {
    "preference": RecordKind(_PREFERENCE_SCHEMA, PreferenceRecord, PREFERENCE_LAYOUTS, _check_preference),
    "pope": RecordKind(_POPE_SCHEMA, PopeQuestion, POPE_LAYOUTS),
    "caption": RecordKind(_CAPTION_SCHEMA, CaptionRecord, {"misp": _Layout()}),
    "sft": RecordKind(_SFT_SCHEMA, SFTRecord, {"misp": _Layout()}),
    "prompt": RecordKind(_PROMPT_SCHEMA, PromptRecord, {"misp": _Layout()}),
    "mmvp": RecordKind(_MMVP_SCHEMA, MMVPPair, {"misp": _Layout()}, _check_mmvp),
    "grounding": RecordKind(_GROUNDING_SCHEMA, GroundingRecord, {"misp": _Layout()}, _check_grounding),
}
"""Every kind of record misp reads, by name: what :func:`read_records` validates each row into."""


def _with_defaults(schema: tuple[_Field, ...], defaults: Mapping[str, Any] | None) -> tuple[_Field, ...]:
    # A default makes a field optional: rows that lack it take the value (official POPE files name no split).
    if not defaults:
        return schema
    names = {f.name for f in schema}
    for name, value in defaults.items():
        if name not in names:
            raise ValueError(f"defaults names unknown field {name!r}; the record has {sorted(names)}")
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"the default {name} must be a non-empty string")
    return tuple(
        replace(f, required=False, default=(lambda ctx, v=defaults[f.name]: v)) if f.name in defaults else f
        for f in schema
    )


def read_records(
    kind: str,
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    layout: str = "misp",
    key_map: Mapping[str, str] | None = None,
    on_bad_record: OnBadRecord = "raise",
    verify_images: bool = True,
    defaults: Mapping[str, Any] | None = None,
    dataset_split: str = "train",
    dataset_revision: str | None = None,
    streaming: bool = False,
    image_store: str | os.PathLike | None = None,
    ratings: RatingRule | None = None,
) -> ReadResult:
    """Read and validate the records of a file or dataset into records of ``kind`` (see :data:`RECORD_KINDS`).

    Args:
        kind: preference, pope, caption, sft, prompt, mmvp or grounding.
        path: a JSON Lines file or a file holding one JSON array; or a dataset: a ``.parquet`` or
            ``.arrow`` file, a dataset folder or a hub id (``misp.data.record_source``).
        image_root: Folder relative image paths start from; default: the file's (dataset's) folder.
        layout: the source format (``PREFERENCE_LAYOUTS``, ``POPE_LAYOUTS``; other kinds have ``misp``).
        key_map: misp field -> source key (column); overrides the layout's key for that field.
        on_bad_record: "raise" stops at the first bad record; "skip" drops bad records and warns once.
        verify_images: Open and decode every image (and negative) now.
        defaults: field -> value for rows that lack the field (which makes it optional).
        dataset_split: the split of a dataset to read.
        dataset_revision: the revision of a hub dataset.
        streaming: stream a dataset's rows instead of memory-mapping it.
        image_store: the folder embedded images are written to, once each, named by content; default
            ``~/.cache/misp/images``.
        ratings: how a VLFeedback row's rated completions become a pair.

    Raises:
        RecordError: A bad record (in "raise" mode), or a missing, empty or all-bad file or dataset.
        ValueError: an unknown kind, layout, key_map field or on_bad_record.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; choose from {sorted(RECORD_KINDS)}")
    spec = RECORD_KINDS[kind]
    if layout not in spec.layouts:
        raise ValueError(f"unknown {kind} layout {layout!r}; choose from {sorted(spec.layouts)}")
    if on_bad_record not in ("raise", "skip"):
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
    lay = spec.layouts[layout]
    schema = _with_defaults(spec.schema, defaults)
    names = {f.name for f in schema} | set(lay.keys)
    keys = dict(lay.keys)
    for native, source in (key_map or {}).items():
        if native not in names:
            raise ValueError(f"key_map names unknown field {native!r}; {spec.record_cls.__name__} has {sorted(names)}")
        if not isinstance(source, str) or not source:
            raise ValueError(f"key_map[{native!r}] must be a non-empty string, got {source!r}")
        keys[native] = source

    split: str | None = None
    if is_dataset_source(path):
        try:
            dataset = open_dataset(path, dataset_split, dataset_revision, streaming)
        except UserError as e:
            raise RecordError(path, None, None, str(e).split(": ", 1)[-1], split=dataset_split) from None
        split = dataset_split
        shown = Path(dataset.name)
        rows: Any = dataset.rows()
        total = None if streaming else len(dataset)
        base = Path(image_root).expanduser() if image_root is not None else dataset.base
        _check_columns(dataset, keys, schema, lay)
    else:
        shown = Path(path)
        rows = _load_rows(shown)
        total = len(rows)
        base = Path(image_root).expanduser() if image_root is not None else shown.parent
    store = ImageStore(image_store if image_store is not None else Path.home() / ".cache" / "misp" / "images")
    ctx = _Context(base=base.absolute(), verify=verify_images, verified={}, store=store)
    options = LayoutOptions(ratings=ratings or RatingRule())

    def error(line: int | None, field_: str | None, reason: str) -> RecordError:
        return RecordError(shown, line, field_, reason, split=split)

    records: list = []
    record_lines: list[int] = []
    skipped: list[RecordError] = []
    seen: dict[str, int] = {}
    id_src = keys.get("id", "id")
    count = 0
    for index, (line, row) in enumerate(
        tqdm(rows, total=total, desc=f"validating {shown.name}", leave=False, disable=None)
    ):
        count += 1
        ctx.index = index
        try:
            if isinstance(row, RecordError):
                raise row
            try:
                values = _validate(row, schema, keys, lay, ctx, options)
                if spec.check is not None:
                    spec.check(values, keys)
            except _FieldError as e:
                raise error(line, e.field, e.reason) from None
            rid = values["id"]
            if rid in seen:
                where = f"row {seen[rid]}" if split is not None else f"line {seen[rid]}"
                raise error(line, id_src, f"duplicate id {rid!r} (first at {where})")
            seen[rid] = line
            records.append(spec.record_cls(**values))
            record_lines.append(line)
        except RecordError as e:
            if on_bad_record == "raise":
                raise
            skipped.append(e)

    if count == 0:
        raise error(None, None, "no records")
    if skipped:
        if not records:
            raise error(None, None, f"all {count} records are invalid; first: {skipped[0]}")
        where = f"{shown} [split {split}]" if split is not None else f"{shown}"
        logger.warning("skipped %d of %d records in %s: first: %s", len(skipped), count, where, skipped[0])
    return ReadResult(records=records, skipped=skipped, path=shown, lines=record_lines, split=split, rows=count)


def _check_columns(dataset: DatasetRows, keys: Mapping[str, str], schema: tuple[_Field, ...], layout: _Layout) -> None:
    """A required column the dataset lacks fails every row: say so once, naming the column and those it has."""
    columns = set(dataset.columns)
    if not columns:
        return
    wanted = [keys.get(f.name, f.name) for f in schema if f.required and not (f.name == "id" and layout.id_from_index)]
    if layout.prepare is not None:
        wanted = [keys.get(name, name) for name in layout.required]
    for key in wanted:
        head = key.split(".", 1)[0]
        name = next((f.name for f in schema if keys.get(f.name, f.name) == key), None)
        others = layout.alternatives.get(name, ()) if name is not None and key == layout.keys.get(name) else ()
        if head not in columns and not any(o.split(".", 1)[0] in columns for o in others):
            raise RecordError(
                dataset.name, None, head, f"missing column (the dataset has {sorted(columns)}); set it with key_map",
                split=dataset.split,
            )


# ---------------------------------------------------------------------------------------------------
# Readers: one per kind, kept by name for their callers


def read_preference_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None, **options: Any) -> ReadResult:
    """Read and validate preference records into :class:`PreferenceRecord` s (``read_records("preference", ...)``).

    ``layout`` is one of :data:`PREFERENCE_LAYOUTS` (misp, mdpo, rlhfv, rlaifv, trl, sharegpt, povid,
    swift, vlfeedback; docs/data.md); the other options are :func:`read_records`'.
    """
    return read_records("preference", path, image_root, **options)


def read_pope_questions(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, layout: str = "misp",
    split: str | None = None, **options: Any,
) -> ReadResult:
    """Read and validate POPE questions into :class:`PopeQuestion` s.

    Args:
        path: JSON Lines file, or a file holding one JSON array.
        image_root: Folder relative image paths start from; default: the file's folder.
        layout: "misp" (native keys) or "pope" (official POPE files: question_id, image, text, label).
        split: POPE split for records that name none (official POPE files hold one split each); when None,
            every record must have a ``split``.
        options: :func:`read_records`' other options.
    """
    if split is not None and not split.strip():
        raise ValueError("split must be a non-empty name or None")
    return read_records("pope", path, image_root, layout, defaults={"split": split} if split else None, **options)


def read_caption_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None, **options: Any) -> ReadResult:
    """``{id?, image, caption}`` records into :class:`CaptionRecord` s (options: :func:`read_records`)."""
    return read_records("caption", path, image_root, **options)


def read_sft_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None, **options: Any) -> ReadResult:
    """``{id?, image, prompt, response}`` records into :class:`SFTRecord` s (options: :func:`read_records`)."""
    return read_records("sft", path, image_root, **options)


def read_prompt_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None, **options: Any) -> ReadResult:
    """Captioning test prompts ``{id?, image, prompt, objects}`` into :class:`PromptRecord` s; ``objects``
    lists the ground-truth object names of the image (CHAIR's reference; may be empty)."""
    return read_records("prompt", path, image_root, **options)


def read_mmvp_pairs(path: str | os.PathLike, image_root: str | os.PathLike | None = None, **options: Any) -> ReadResult:
    """Shapes-MMVP pairs ``{id?, image_a, image_b, question, answer_a, answer_b, attribute}`` into
    :class:`MMVPPair` s (mmvp.jsonl of a world); answers are "yes" or "no" and must differ."""
    return read_records("mmvp", path, image_root, **options)


def read_grounding_records(path: str | os.PathLike, image_root: str | os.PathLike | None = None, **options: Any) -> ReadResult:
    """Likelihood-grounding records ``{id?, image, prompt, caption, counterfactuals, attributes}`` into
    :class:`GroundingRecord` s; ``counterfactuals`` is a non-empty list of images, ``attributes`` names
    what each changes."""
    return read_records("grounding", path, image_root, **options)
