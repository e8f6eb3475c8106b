"""VLM logits for rows that share images, encoding each distinct image once, for every model family.

A DPO batch scores the chosen and the rejected response against the same positive image, and the
multi-negative losses score one response against several images. ``vlm_logits`` takes the U distinct
images once (:class:`misp.batch.ImageInputs`, as the family's processor made them) and an index saying
which image each of the N rows uses, so the vision tower and projector run on U images, not N.

How: the model's own forward runs with the U images, and the family (``misp.models.families``) hooks its
vision side to repeat each image's features into the rows that use it (LLaVA: the projector's output;
Qwen2.5-VL: the merger's, with the grids the M-RoPE positions are computed from given per row). Going
through the model's forward (instead of passing ``inputs_embeds``) keeps every wrapper in charge of its
own parameters: peft's LoRA and ``disable_adapter``, bitsandbytes 4-bit layers, and FSDP1/FSDP2, which
gather sharded parameters only inside the root module's forward.

Families whose image token count depends on the image (dynamic resolution) keep one image placeholder per
text row until the batch's images are known; ``vlm_logits`` expands each row's placeholder into as many
tokens as its image takes (``ImageInputs.tokens_per_image``), so rows whose images differ in size, and
negatives of another size than the positive, batch together.
"""

from __future__ import annotations

import torch
from torch import nn

from misp.batch import ImageInputs
from misp.logprobs import IGNORE_INDEX
from misp.models.families import family_of
from misp.models.families.llava import find_projector, position_ids_from_mask

__all__ = ["expand_image_rows", "find_projector", "position_ids_from_mask", "positions_to_keep",
           "response_logits", "vlm_logits"]


def _image_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__}'s config names no image token (image_token_id)")


def expand_image_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, image_token_id: int,
    tokens_per_row: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row's single image placeholder expanded into ``tokens_per_row[i]`` image tokens.

    A row already holding ``tokens_per_row[i]`` image tokens is kept (fixed-count families expand when they
    encode). Rows keep their padding side (left when any row starts with padding); labels of image tokens
    are ``IGNORE_INDEX``.

    Returns:
        ``(input_ids, attention_mask, labels)`` (labels None when given None); the inputs themselves when
        no row needs expanding.
    """
    counts = ((input_ids == image_token_id) & attention_mask.bool()).sum(1)
    want = tokens_per_row.to(counts.device)
    if torch.equal(counts, want):
        return input_ids, attention_mask, labels
    bad = [i for i in range(len(counts)) if int(counts[i]) not in (1, int(want[i]))]
    if bad:
        i = bad[0]
        raise ValueError(
            f"row {i} holds {int(counts[i])} image tokens; a row holds one image placeholder (expanded here) "
            f"or its image's {int(want[i])} tokens"
        )
    left = bool((attention_mask[:, 0] == 0).any())
    pad_id = int(input_ids[attention_mask == 0][0]) if bool((attention_mask == 0).any()) else 0
    rows, row_labels = [], []
    for i in range(input_ids.shape[0]):
        real = attention_mask[i].bool()
        ids = input_ids[i][real]
        lab = labels[i][real] if labels is not None else None
        if int(counts[i]) != int(want[i]):
            at = int((ids == image_token_id).nonzero()[0, 0])
            n = int(want[i])
            ids = torch.cat([ids[:at], ids.new_full((n,), image_token_id), ids[at + 1 :]])
            if lab is not None:
                lab = torch.cat([lab[:at], lab.new_full((n,), IGNORE_INDEX), lab[at + 1 :]])
        rows.append(ids)
        row_labels.append(lab)
    width = max(len(r) for r in rows)
    out_ids = input_ids.new_full((len(rows), width), pad_id)
    out_mask = attention_mask.new_zeros((len(rows), width))
    out_labels = labels.new_full((len(rows), width), IGNORE_INDEX) if labels is not None else None
    for i, ids in enumerate(rows):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        out_ids[i, cols] = ids
        out_mask[i, cols] = 1
        if out_labels is not None:
            out_labels[i, cols] = row_labels[i]
    return out_ids, out_mask, out_labels


def _as_image_inputs(images: ImageInputs | torch.Tensor, input_ids: torch.Tensor, image_token_id: int) -> ImageInputs:
    if isinstance(images, ImageInputs):
        return images
    # A bare LLaVA pixel tensor [U, 3, H, W]: a fixed-count family, whose rows are expanded already.
    if images.dim() != 4:
        raise ValueError(f"pixel_values must be [U, 3, H, W], got {tuple(images.shape)}")
    per_image = int((input_ids[0] == image_token_id).sum()) if input_ids.shape[0] else 0
    return ImageInputs({"pixel_values": images}, torch.full((images.shape[0],), per_image, dtype=torch.long))


def _check_index(image_index: torch.Tensor | None, n: int, u: int) -> torch.Tensor | None:
    if image_index is None:
        if u != n:
            raise ValueError(f"{n} rows but {u} images; pass image_index to share images between rows")
        return None
    image_index = torch.as_tensor(image_index, dtype=torch.long)
    if image_index.shape != (n,):
        raise ValueError(f"image_index must have shape [{n}] (one image per row), got {tuple(image_index.shape)}")
    if n and (int(image_index.min()) < 0 or int(image_index.max()) >= u):
        raise ValueError(f"image_index values must lie in [0, {u}), got {image_index.tolist()}")
    if u == n and torch.equal(image_index.cpu(), torch.arange(n)):
        return None  # the identity: nothing to repeat
    return image_index


def vlm_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images: ImageInputs | torch.Tensor,
    image_index: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Next-token logits ``[N, T', V]`` of a VLM of any registered family; each distinct image is encoded once.

    Args:
        model: a transformers VLM of a registered family, possibly peft-wrapped (also inside
            ``disable_adapter()``), 4-bit quantised or FSDP-wrapped.
        input_ids: ``[N, T]`` token ids, each row with one image: expanded (``encode_example`` for a
            fixed-count family) or one placeholder, expanded here against ``images.tokens_per_image``
            (then T' > T; :func:`response_logits` expands the labels alike).
        attention_mask: ``[N, T]``, 1 on real tokens.
        images: the U distinct images (``ImageInputs``; a bare ``[U, 3, H, W]`` tensor is taken as LLaVA's
            pixel values).
        image_index: ``[N]`` long, row i uses image ``image_index[i]``; ``None`` means row i uses image i
            (then U must equal N).
        logits_to_keep: compute the LM head on the last this many positions only (0: all), as
            transformers' ``logits_to_keep``; see :func:`response_logits`.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids must be [N, T] and attention_mask the same shape; got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    family = family_of(model)
    image_token_id = _image_token_id(model)
    images = _as_image_inputs(images, input_ids, image_token_id)
    n = input_ids.shape[0]
    image_index = _check_index(image_index, n, len(images))
    per_row = images.tokens_per_image if image_index is None else images.tokens_per_image[image_index.to(images.tokens_per_image.device)]
    input_ids, attention_mask, _ = expand_image_rows(input_ids, attention_mask, None, image_token_id, per_row)
    kwargs = family.forward_inputs(model, input_ids, attention_mask, images, image_index)
    with family.shared_images(model, images, image_index):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **kwargs,
            **({"logits_to_keep": logits_to_keep} if logits_to_keep else {}),
        )
    return out.logits


def positions_to_keep(labels: torch.Tensor) -> int:
    """The trailing positions whose logits a causal loss on ``labels`` reads; 0 when that is all of them.

    The logit at position t predicts the label at t + 1, so every logit the loss reads lies at or after
    the position before the earliest scored label of any row. In a VLM batch everything before it is image
    and prompt (576 image tokens per LLaVA-1.5 row), whose logits would be computed and thrown away.
    """
    scored = labels[:, 1:] != IGNORE_INDEX
    rows = scored.any(dim=1)
    if not bool(rows.any()):
        return 1  # nothing is scored: one position keeps the shapes valid
    first = int(scored[rows].float().argmax(dim=1).min())
    keep = labels.shape[1] - first
    return 0 if keep >= labels.shape[1] else keep


def response_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    images: ImageInputs | torch.Tensor,
    labels: torch.Tensor,
    image_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vlm_logits` on the positions a loss on ``labels`` reads, with ``labels`` cut to match.

    Returns ``(logits [N, T', V], labels [N, T'])``, T' <= T: the same log-probs as the full logits and
    labels give (``sequence_logps``, shifted cross-entropy), without the LM head and the logits of the
    image and prompt positions before the first response token of the batch. Rows holding one image
    placeholder are expanded first (``labels`` with them), as :func:`vlm_logits` does.
    """
    image_token_id = _image_token_id(model)
    images = _as_image_inputs(images, input_ids, image_token_id)
    index = _check_index(image_index, input_ids.shape[0], len(images))
    per_row = images.tokens_per_image if index is None else images.tokens_per_image[index.to(images.tokens_per_image.device)]
    input_ids, attention_mask, labels = expand_image_rows(input_ids, attention_mask, labels, image_token_id, per_row)
    keep = positions_to_keep(labels)
    logits = vlm_logits(model, input_ids, attention_mask, images, image_index, logits_to_keep=keep)
    return logits, labels[:, -logits.shape[1] :]
