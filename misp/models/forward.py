"""VLM logits for rows that share images, encoding each distinct image once.

A DPO batch scores the chosen and the rejected response against the same positive image, and the
multi-negative losses score one response against several images. ``vlm_logits`` takes the U distinct
images once and an index saying which image each of the N rows uses, so the vision tower and projector
run on U images, not N.

How: the model's own forward runs with the U images; a forward hook on the multimodal projector
repeats its output ``[U, P, H]`` into ``[N, P, H]`` by ``image_index`` before LLaVA scatters it into the
``<image>`` positions. Going through the model's forward (instead of calling ``get_image_features``
and passing ``inputs_embeds``) keeps every wrapper in charge of its own parameters: peft's LoRA and
``disable_adapter``, bitsandbytes 4-bit layers, and FSDP1/FSDP2, which gather sharded parameters only
inside the root module's forward. The projector has run once on the whole image batch in every
transformers release from 4.4x to 5.23, which is all this relies on.
"""

from __future__ import annotations

import torch
from torch import nn

from misp.logprobs import IGNORE_INDEX

_PROJECTOR_NAME = "multi_modal_projector"


def find_projector(model: nn.Module) -> nn.Module:
    """The LLaVA multimodal projector inside ``model`` (plain, peft-wrapped, quantised or FSDP-wrapped)."""
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == _PROJECTOR_NAME]
    if len(found) != 1:
        raise ValueError(
            f"expected one '{_PROJECTOR_NAME}' module in {type(model).__name__}, found {len(found)}; "
            "vlm_logits supports LLaVA-style models (LlavaForConditionalGeneration)"
        )
    return found[0]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left- and right-padded rows get the same logits."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def vlm_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_index: torch.Tensor | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Next-token logits ``[N, T, V]`` of a LLaVA model; each distinct image is encoded once.

    Args:
        model: a ``LlavaForConditionalGeneration``, possibly peft-wrapped (also inside
            ``disable_adapter()``), 4-bit quantised or FSDP-wrapped.
        input_ids: ``[N, T]`` token ids, each row with exactly one expanded image (``encode_example``).
        attention_mask: ``[N, T]``, 1 on real tokens.
        pixel_values: ``[U, 3, H, W]``, the distinct images.
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
    n, u = input_ids.shape[0], pixel_values.shape[0]
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [U, 3, H, W], got {tuple(pixel_values.shape)}")
    if image_index is None:
        if u != n:
            raise ValueError(f"{n} rows but {u} images; pass image_index to share images between rows")
    else:
        image_index = torch.as_tensor(image_index, dtype=torch.long)
        if image_index.shape != (n,):
            raise ValueError(f"image_index must have shape [{n}] (one image per row), got {tuple(image_index.shape)}")
        if n and (int(image_index.min()) < 0 or int(image_index.max()) >= u):
            raise ValueError(f"image_index values must lie in [0, {u}), got {image_index.tolist()}")
        if u == n and torch.equal(image_index.cpu(), torch.arange(n)):
            image_index = None  # the identity: nothing to repeat

    handle = None
    if image_index is not None:
        index = image_index

        def repeat_features(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if output.shape[0] != u:
                raise RuntimeError(
                    f"the projector saw {output.shape[0]} images, expected the {u} distinct ones; this model's "
                    "forward does not project all images in one call"
                )
            return output.index_select(0, index.to(output.device))

        handle = find_projector(model).register_forward_hook(repeat_features)
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            **({"logits_to_keep": logits_to_keep} if logits_to_keep else {}),
        )
    finally:
        if handle is not None:
            handle.remove()
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
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    image_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vlm_logits` on the positions a loss on ``labels`` reads, with ``labels`` cut to match.

    Returns ``(logits [N, T', V], labels [N, T'])``, T' <= T: the same log-probs as the full logits and
    labels give (``sequence_logps``, shifted cross-entropy), without the LM head and the logits of the
    image and prompt positions before the first response token of the batch.
    """
    keep = positions_to_keep(labels)
    logits = vlm_logits(model, input_ids, attention_mask, pixel_values, image_index, logits_to_keep=keep)
    return logits, labels[:, -logits.shape[1] :]
