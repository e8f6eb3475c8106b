"""LLaVA-1.5 (``llava-hf/llava-1.5-7b-hf`` and the tiny Shapes LLaVA): CLIP tower, two-layer projector,
Llama decoder; every image is 576 tokens (64 in the tiny model), known before any image is seen."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image
from torch import nn
from transformers import ProcessorMixin

from misp.batch import ImageInputs
from misp.models.families.base import ModelFamily, bare_question

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""The chat template of llava-hf/llava-1.5-7b-hf (its ``chat_template.json``): a user turn with one image
renders as ``"USER: <image>\\n{text} ASSISTANT:"``, the template misp's prompting writes itself."""


PROMPT_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"
"""LLaVA-1.5's conversation template for one image and one question (its hub chat template renders it)."""

PROJECTOR_NAME = "multi_modal_projector"


def find_projector(model: nn.Module) -> nn.Module:
    """The LLaVA multimodal projector inside ``model`` (plain, peft-wrapped, quantised or FSDP-wrapped)."""
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == PROJECTOR_NAME]
    if len(found) != 1:
        raise ValueError(
            f"expected one '{PROJECTOR_NAME}' module in {type(model).__name__}, found {len(found)}; "
            "the LLaVA family's forward needs LlavaForConditionalGeneration"
        )
    return found[0]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left- and right-padded rows get the same logits."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    """``images`` converted to RGB where they are not."""
    if not images:
        raise ValueError("no images to prepare")
    return [im.convert("RGB") if im.mode != "RGB" else im for im in images]


class Llava15Family(ModelFamily):
    """LLaVA-1.5: fixed 336 px crop, one projector call over the whole image batch, 1-D positions."""

    name = "llava-1.5"
    model_types = ("llava",)
    processor_classes = ("LlavaProcessor",)
    examples = "llava-hf/llava-1.5-7b-hf, llava-hf/llava-1.5-13b-hf"
    unquantized_modules = ("vision_tower", "multi_modal_projector", "lm_head")
    max_images = 1  # trained on one image per conversation; its template has one place for it

    def format_prompt(self, processor: ProcessorMixin, prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """``"USER: <image>\\n{prompt} ASSISTANT:"``. A prompt already holding ``<image>`` is LLaVA-templated
        (mDPO's files store the full conversation prompt) and kept verbatim; one templated for another
        family is re-templated. A conversation (``history``) goes through the hub's chat template
        (``USER: <image>\\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:``)."""
        if history:
            template = getattr(processor, "chat_template", None) or CHAT_TEMPLATE
            return processor.apply_chat_template(
                self.messages(bare_question(prompt), history), chat_template=template, add_generation_prompt=True,
                tokenize=False,
            ).rstrip()
        if "<image>" in prompt and "<|im_start|>" not in prompt and "<start_of_turn>" not in prompt:
            return prompt
        return PROMPT_TEMPLATE.format(prompt=bare_question(prompt))

    def expand_image_text(self, processor: ProcessorMixin, text: str) -> str:
        """``<image>`` (the template's marker) repeated as the processor's image token."""
        return text.replace("<image>", self.image_token(processor) * self.fixed_image_tokens(processor))

    def fixed_image_tokens(self, processor: ProcessorMixin) -> int:
        """As ``LlavaProcessor`` counts them: patches of the crop, plus the backbone's extra tokens (CLS),
        minus one under the 'default' feature strategy (which drops CLS)."""
        patch = getattr(processor, "patch_size", None)
        if not patch:
            raise ValueError(f"{type(processor).__name__} has no patch_size; it cannot expand <image> into image tokens")
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
        size = crop or getattr(ip, "size", None) or {}
        if "height" not in size or "width" not in size:
            raise ValueError(
                f"the image processor's output size is not fixed ({size}); encode_example needs a square "
                "crop (do_center_crop with crop_size) to know the number of image tokens"
            )
        n = (size["height"] // patch) * (size["width"] // patch) + int(getattr(processor, "num_additional_image_tokens", 0) or 0)
        if getattr(processor, "vision_feature_select_strategy", None) == "default":
            n -= 1
        return n

    def prepare_images(self, processor: ProcessorMixin, images: Sequence[Image.Image]) -> ImageInputs:
        """``pixel_values [U, 3, H, W]``; every image is :meth:`fixed_image_tokens` tokens."""
        pixels = processor.image_processor(images=rgb(images), return_tensors="pt")["pixel_values"]
        return ImageInputs({"pixel_values": pixels}, torch.full((len(images),), self.fixed_image_tokens(processor)))

    def forward_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       images: ImageInputs, image_index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The pixels, and positions counted over real tokens (so padding on either side changes nothing)."""
        return {"pixel_values": images.tensors["pixel_values"], "position_ids": position_ids_from_mask(attention_mask)}

    @contextmanager
    def shared_images(self, model: nn.Module, images: ImageInputs, image_index: torch.Tensor | None) -> Iterator[None]:
        """A forward hook on the projector repeats its output ``[U, P, H]`` into ``[N, P, H]`` by
        ``image_index`` before LLaVA scatters it into the ``<image>`` positions. The projector has run once
        on the whole image batch in every transformers release from 4.4x to 5.2x, which is all this relies on."""
        if image_index is None:
            yield
            return
        u = len(images)

        def repeat_features(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if output.shape[0] != u:
                raise RuntimeError(
                    f"the projector saw {output.shape[0]} images, expected the {u} distinct ones; this model's "
                    "forward does not project all images in one call"
                )
            return output.index_select(0, image_index.to(output.device))

        handle = find_projector(model).register_forward_hook(repeat_features)
        try:
            yield
        finally:
            handle.remove()
