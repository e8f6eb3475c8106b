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
from misp.models.families.base import attention_implementation, unwrapped
from misp.models.families.llava import find_projector, position_ids_from_mask
from misp.models.prefix_sharing import (
    attention_pair_weight,
    block_mask,
    choose_layout,
    gather_packed,
    log_fallback_once,
    packed_keep,
    unpack_logits,
)

__all__ = ["expand_image_rows", "find_projector", "images_per_row", "position_ids_from_mask", "positions_to_keep",
           "response_logits", "vlm_logits"]


def _image_token_id(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__}'s config names no image token (image_token_id)")


def _image_runs(ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of consecutive image tokens in the 1-D ``ids``: one per image (every
    family's template puts text or a marker token between two images)."""
    is_image = (ids == image_token_id).to(torch.int8)
    if not bool(is_image.any()):
        return []
    edges = torch.diff(torch.cat([is_image.new_zeros(1), is_image, is_image.new_zeros(1)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return [(a, b - a) for a, b in zip(starts, ends, strict=True)]


def images_per_row(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> list[int]:
    """How many images each row of ``[N, T]`` ids holds (runs of image tokens among its real tokens)."""
    return [len(_image_runs(ids[m.bool()], image_token_id)) for ids, m in zip(input_ids, attention_mask, strict=True)]


def expand_image_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None, image_token_id: int,
    tokens_per_row: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each image placeholder of each row expanded into its image's tokens.

    ``tokens_per_row`` holds one count per image slot, in row order (row 0's images in text order, then row
    1's, ...): with one image per row, one count per row. A slot already holding its count of image tokens is
    kept (fixed-count families expand when they encode); a single placeholder token is expanded. Rows keep
    their padding side (left when any row starts with padding); labels of image tokens are ``IGNORE_INDEX``.

    Returns:
        ``(input_ids, attention_mask, labels)`` (labels None when given None); the inputs themselves when
        no slot needs expanding.
    """
    counts = ((input_ids == image_token_id) & attention_mask.bool()).sum(1)
    if tokens_per_row.shape[0] == input_ids.shape[0] and torch.equal(counts, tokens_per_row.to(counts.device)):
        return input_ids, attention_mask, labels  # one image per row, expanded already: no per-row scan
    want = [int(c) for c in tokens_per_row.tolist()]
    runs = [_image_runs(ids[m.bool()], image_token_id) for ids, m in zip(input_ids, attention_mask, strict=True)]
    if sum(len(r) for r in runs) != len(want):
        raise ValueError(
            f"the rows hold {sum(len(r) for r in runs)} images ({[len(r) for r in runs]} per row) but "
            f"{len(want)} image token counts were given"
        )
    slot, plan, changed = 0, [], False
    for i, row_runs in enumerate(runs):
        row_plan = []
        for start, length in row_runs:
            n = want[slot]
            if length not in (1, n):
                raise ValueError(
                    f"row {i} holds an image of {length} image tokens; a row holds one image placeholder per "
                    f"image (expanded here) or its image's {n} tokens"
                )
            if length != n:
                row_plan.append((start, n))
                changed = True
            slot += 1
        plan.append(row_plan)
    if not changed:
        return input_ids, attention_mask, labels
    left = bool((attention_mask[:, 0] == 0).any())
    pad_id = int(input_ids[attention_mask == 0][0]) if bool((attention_mask == 0).any()) else 0
    rows, row_labels = [], []
    for i in range(input_ids.shape[0]):
        real = attention_mask[i].bool()
        ids = input_ids[i][real]
        lab = labels[i][real] if labels is not None else None
        for at, n in reversed(plan[i]):  # from the right, so earlier positions stay valid
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


def _slots(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> int:
    """The number of images the rows hold together: N when every row holds one (the common case, counted
    without a scan), else the total of :func:`images_per_row`."""
    counts = ((input_ids == image_token_id) & attention_mask.bool()).sum(1)
    if bool((counts == 1).all()):
        return input_ids.shape[0]
    return sum(images_per_row(input_ids, attention_mask, image_token_id))


def _check_index(image_index: torch.Tensor | None, n: int, u: int) -> torch.Tensor | None:
    # n: image slots (one per row, or each row's several images in row order).
    if image_index is None:
        if u != n:
            raise ValueError(f"{n} image slots in the rows but {u} images; pass image_index to share images between rows")
        return None
    image_index = torch.as_tensor(image_index, dtype=torch.long)
    if image_index.shape != (n,):
        raise ValueError(f"image_index must have shape [{n}] (one image per image slot of the rows, in row order), "
                         f"got {tuple(image_index.shape)}")
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
        input_ids: ``[N, T]`` token ids, each row with one image (or several, for families that take them),
            each image expanded (``encode_example`` for a fixed-count family) or one placeholder, expanded
            here against ``images.tokens_per_image`` (then T' > T; :func:`response_logits` expands the
            labels alike).
        attention_mask: ``[N, T]``, 1 on real tokens.
        images: the U distinct images (``ImageInputs``; a bare ``[U, 3, H, W]`` tensor is taken as LLaVA's
            pixel values).
        image_index: ``[S]`` long, one per image slot of the rows in row order (S = N when each row holds
            one image: row i uses image ``image_index[i]``); ``None`` means slot s uses image s (then U must
            equal S).
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
    image_index = _check_index(image_index, _slots(input_ids, attention_mask, image_token_id), len(images))
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
    prefix_sharing: bool = False,
    padding_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vlm_logits` on the positions a loss on ``labels`` reads, with ``labels`` cut to match.

    Returns ``(logits [N, T', V], labels [N, T'])``, T' <= T: the same log-probs as the full logits and
    labels give (``sequence_logps``, shifted cross-entropy), without the LM head and the logits of the
    image and prompt positions before the first response token of the batch. Rows holding one image
    placeholder are expanded first (``labels`` with them), as :func:`vlm_logits` does.

    With ``prefix_sharing``, rows that hold the same images and the same tokens before their first scored
    label (a DPO pair's chosen and rejected rows) run as one packed sequence with a block mask, the prefix
    computed once (``misp.models.prefix_sharing``). With ``padding_free``, the sequences (shared groups and
    rows of their own alike) are bin-packed several to a row, so the decoder runs less padding where lengths
    vary. Per batch the cheapest layout runs (``misp.models.prefix_sharing.choose_layout``); the returned
    logits are laid out as the unpacked rows' and equal them to float rounding. Where the model cannot run a
    packed layout exactly the unshared rows run, and the reason is logged once.
    """
    image_token_id = _image_token_id(model)
    images = _as_image_inputs(images, input_ids, image_token_id)
    index = _check_index(image_index, _slots(input_ids, attention_mask, image_token_id), len(images))
    per_row = images.tokens_per_image if index is None else images.tokens_per_image[index.to(images.tokens_per_image.device)]
    input_ids, attention_mask, labels = expand_image_rows(input_ids, attention_mask, labels, image_token_id, per_row)
    keep = positions_to_keep(labels)
    if prefix_sharing or padding_free:
        logits = _packed_response_logits(model, input_ids, attention_mask, images, labels, index, keep, prefix_sharing,
                                         padding_free)
        if logits is not None:
            return logits, labels[:, -logits.shape[1] :]
    logits = vlm_logits(model, input_ids, attention_mask, images, image_index, logits_to_keep=keep)
    return logits, labels[:, -logits.shape[1] :]


def _packed_response_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: ImageInputs,
    labels: torch.Tensor, index: torch.Tensor | None, keep: int, prefix_sharing: bool, padding_free: bool,
) -> torch.Tensor | None:
    """:func:`response_logits`' logits from a packed layout (shared prefixes computed once, sequences
    bin-packed); None when the unshared rows are cheaper or the model cannot run it exactly (the caller
    then runs the unshared rows). Rows are expanded already."""
    family = family_of(model)
    reason = family.prefix_sharing_refusal(model, attention_mask)
    if reason is not None:
        log_fallback_once(reason)
        return None
    image_token_id = _image_token_id(model)
    n, t = input_ids.shape
    counts = [1] * n if _slots(input_ids, attention_mask, image_token_id) == n else images_per_row(
        input_ids, attention_mask, image_token_id)
    slots = index.tolist() if index is not None else list(range(sum(counts)))
    bounds = torch.tensor([0, *counts]).cumsum(0).tolist()
    slot_keys = [tuple(slots[bounds[i] : bounds[i + 1]]) for i in range(n)]
    weight = attention_pair_weight(unwrapped(model).config.get_text_config())
    plan = choose_layout(input_ids, attention_mask, labels, slot_keys, prefix_sharing, padding_free, weight)
    if plan is None:
        return None
    device = input_ids.device
    positions = family.row_position_ids(model, input_ids, attention_mask, images, index)
    packed_ids = gather_packed(input_ids, plan)
    packed_real = (plan.segment >= 0).to(device=device, dtype=attention_mask.dtype)
    # The images in the order their tokens sit in the packed rows, which is the order the model fills them in.
    packed_slots = [s for seqs in plan.rows for q in seqs for s in slot_keys[plan.groups[q][0]]]
    packed_index = _check_index(torch.tensor(packed_slots, dtype=torch.long), len(packed_slots), len(images))
    if packed_index is not None:
        packed_index = packed_index.to(device)
    kwargs = family.forward_inputs(model, packed_ids, packed_real, images, packed_index)
    kwargs["position_ids"] = gather_packed(positions, plan)
    image_blocks = None
    if family.bidirectional_image_attention:
        is_image = (packed_ids == image_token_id).long().cpu()
        starts = is_image * (torch.diff(is_image, dim=1, prepend=torch.zeros_like(is_image[:, :1])) == 1).long()
        image_blocks = starts.cumsum(1) * is_image
    allow = block_mask(plan, image_blocks).to(device)
    if attention_implementation(model) == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(allow.shape, dtype=torch.float32, device=device)
        mask.masked_fill_(~allow, torch.finfo(torch.float32).min)
    else:
        mask = allow
    with family.shared_images(model, images, packed_index):
        out = model(input_ids=packed_ids, attention_mask=mask, use_cache=False, logits_to_keep=packed_keep(plan),
                    **kwargs)
    return unpack_logits(out.logits, plan, keep or t, t)
