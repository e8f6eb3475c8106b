"""The (image, prompt) inputs of preference generation, read with misp's validating record readers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from misp.data.records import read_caption_records, read_prompt_records


@dataclass(frozen=True)
class PromptInput:
    """One (image, prompt) to sample responses for."""

    id: str
    """The record's id (the preference record keeps it)."""
    image: Path
    """The image, absolute."""
    prompt: str
    """The prompt the responses answer."""
    objects: tuple[str, ...] | None = None
    """Ground-truth object names of the image, when the input file has them."""


def read_inputs(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    objects_key: str | None = None,
    prompt: str | None = None,
    limit: int | None = None,
) -> list[PromptInput]:
    """Read ``{id?, image, prompt}`` records (any other keys are ignored), validating every image.

    Args:
        path: JSON Lines file, or a file holding one JSON array.
        image_root: folder relative image paths start from; default: the file's folder.
        objects_key: key of the ground-truth object list (dotted for nested keys, e.g. ``meta.objects``);
            None reads no ground truth.
        prompt: replaces every record's prompt when given.
        limit: keep only the first N records.

    Raises:
        RecordError: a missing or invalid file or record (with file, line and field).
    """
    if objects_key is not None:
        rows = read_prompt_records(path, image_root=image_root, key_map={"objects": objects_key})
        inputs = [PromptInput(r.id, r.image, r.prompt, tuple(r.objects)) for r in rows]
    else:
        # A caption record is (id?, image, text): read the text from the prompt key.
        rows = read_caption_records(path, image_root=image_root, key_map={"caption": "prompt"})
        inputs = [PromptInput(r.id, r.image, r.caption) for r in rows]
    if limit is not None:
        inputs = inputs[:limit]
    if prompt is not None:
        inputs = [PromptInput(r.id, r.image, prompt, r.objects) for r in inputs]
    return inputs
