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
        )
    finally:
        if handle is not None:
            handle.remove()
    return out.logits
