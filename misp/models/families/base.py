"""What a model family is to misp: one small class holds everything that differs between VLM families.

misp's loading, prompting, batching and forward are written once against :class:`ModelFamily`; a family
subclass says how its checkpoints are recognised (``model_types``, read from ``config.json`` before any
weight loads), which modules 4-bit loading must leave unquantised and LoRA must leave alone, which blocks
FSDP wraps, how a prompt is templated, how its processor turns images into :class:`misp.batch.ImageInputs`,
and how a forward encodes each distinct image once when several rows share it.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import ClassVar

import torch
from PIL import Image
from torch import nn
from transformers import ProcessorMixin

from misp.batch import ImageInputs

LANGUAGE_MODEL_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
"""LoRA targets: the decoder's attention and MLP projections only. A bare list of projection names would
also match vision-tower layers in families whose vision MLP reuses the names (Qwen2.5-VL's
``visual.blocks.N.mlp.gate_proj``), so the default is a regex under ``language_model``."""

_FOREIGN_TEMPLATES = (
    # LLaVA-1.5 (mDPO's and RLHF-V's files): "USER: <image>\n{q} ASSISTANT:", with or without the system line.
    re.compile(r"^(?:.*?\n)??(?:USER:|Human:)\s*(?:<image>\s*)?(?P<q>.*?)\s*(?:ASSISTANT:|Assistant:|GPT:)\s*$", re.S),
    # Qwen / ChatML: "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n".
    re.compile(r"^.*<\|im_start\|>user\n(?:<\|vision_start\|><\|image_pad\|><\|vision_end\|>)?(?P<q>.*?)<\|im_end\|>\s*"
               r"<\|im_start\|>assistant\n?$", re.S),
    # Gemma 3: "<bos><start_of_turn>user\n<start_of_image>{q}<end_of_turn>\n<start_of_turn>model\n".
    re.compile(r"^.*<start_of_turn>user\n(?:<start_of_image>)?(?P<q>.*?)<end_of_turn>\s*<start_of_turn>model\n?$", re.S),
)


def bare_question(prompt: str) -> str:
    """The user's question of ``prompt``, with any known family's chat template and image marker removed.

    Public preference files store prompts already templated for the model they were made with (mDPO's:
    LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``); a prompt for another model must be templated anew
    for the model being trained, not passed through.
    """
    for pattern in _FOREIGN_TEMPLATES:
        m = pattern.match(prompt)
        if m:
            return m.group("q").strip()
    if "<image>" not in prompt:
        return prompt
    return prompt.replace("<image>\n", "").replace("<image>", "").strip()


IMAGE_MARKER = "<image>"
"""Where an image goes in a record's prompt (misp's and the public preference files' convention)."""

_SENTINEL = "\u0000misp-image\u0000"


def interleaved_content(question: str) -> list[dict]:
    """A user turn's content for ``question`` holding several ``<image>`` markers: the images where the
    markers are, the text between them (stripped of the newlines that usually follow a marker)."""
    content: list[dict] = []
    parts = question.split(IMAGE_MARKER)
    for j, text in enumerate(parts):
        if text.strip():
            content.append({"type": "text", "text": text.strip()})
        if j < len(parts) - 1:
            content.append({"type": "image"})
    return content


class ModelFamily(ABC):
    """One VLM family. Subclasses set the class attributes and override what their processor or forward
    does differently; instances hold no state."""

    name: ClassVar[str]
    """Short name used in messages and docs (e.g. ``qwen2.5-vl``)."""
    model_types: ClassVar[tuple[str, ...]]
    """``config.json`` ``model_type`` values of this family's checkpoints."""
    processor_classes: ClassVar[tuple[str, ...]]
    """Class names of this family's processors."""
    examples: ClassVar[str]
    """Hub ids of checkpoints of this family, for messages and docs."""
    unquantized_modules: ClassVar[tuple[str, ...]]
    """Module names 4-bit loading leaves in the compute dtype (the vision tower and projector/merger, and
    the LM head), as bitsandbytes' ``llm_int8_skip_modules``."""
    block_suffixes: ClassVar[tuple[str, ...]] = ("DecoderLayer", "EncoderLayer")
    """Class-name endings of the transformer blocks: FSDP's wrap units and activation-checkpointing units."""
    lora_target_modules: ClassVar[str] = LANGUAGE_MODEL_PROJECTIONS
    """LoRA targets (a regex over full module names) reaching the language model only."""
    dynamic_resolution: ClassVar[bool] = False
    """Whether the image token count follows the image size (then ``min_pixels`` / ``max_pixels`` bound it)."""
    max_images: ClassVar[int | None] = None
    """Most images one prompt may hold (None: any number)."""
    response_separator: ClassVar[str] = " "
    """Text between the templated prompt and the response (LLaVA-1.5 writes ``ASSISTANT: answer``)."""
    bidirectional_image_attention: ClassVar[bool] = False
    """Whether one image's tokens attend to each other both ways (Gemma 3): a packed row's block mask
    (``misp.models.prefix_sharing``) must then allow it as the model's own mask does."""

    # --- recognising ------------------------------------------------------------------------------------
    def matches_config(self, config) -> bool:
        """Whether a transformers config (or ``config.json`` dict) is of this family."""
        model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        return model_type in self.model_types

    def is_block(self, module: nn.Module) -> bool:
        """Whether ``module`` is one transformer block (an FSDP unit)."""
        return type(module).__name__.endswith(self.block_suffixes)

    # --- prompting --------------------------------------------------------------------------------------
    def image_token(self, processor: ProcessorMixin) -> str:
        """The token that stands for one image in the text (before expansion)."""
        return processor.image_token

    def image_token_id(self, processor: ProcessorMixin) -> int:
        """The id of :meth:`image_token`."""
        return int(processor.tokenizer.convert_tokens_to_ids(self.image_token(processor)))

    def format_prompt(self, processor: ProcessorMixin, prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """``prompt`` (a bare question, or one templated for any known family) as this family's templated
        user turn with its image(s), ending where the assistant's answer starts; earlier turns of a
        conversation (``history``: (role, text) pairs) come before it, the image in the first user turn."""
        if prompt.count(IMAGE_MARKER) > 1:
            self.check_image_count(prompt.count(IMAGE_MARKER))
            if history:
                raise ValueError("the prompt holds several images and earlier turns: a conversation takes one image, "
                                 "in its first user turn")
            # Several images: they stay where the prompt's markers put them (a foreign template is removed
            # around them; the sentinel keeps bare_question from taking a marker for the template's).
            question = bare_question(prompt.replace(IMAGE_MARKER, _SENTINEL)).replace(_SENTINEL, IMAGE_MARKER)
            messages = [{"role": "user", "content": interleaved_content(question)}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return processor.apply_chat_template(
            self.messages(bare_question(prompt), history), add_generation_prompt=True, tokenize=False
        )

    def check_image_count(self, count: int) -> None:
        """Refuse a prompt of ``count`` images when the family takes fewer, in one line."""
        if self.max_images is not None and count > self.max_images:
            from misp.models.families import FAMILIES

            several = ", ".join(f.name for f in FAMILIES.values() if f.max_images is None or f.max_images > 1)
            raise ValueError(
                f"the prompt contains {IMAGE_MARKER!r} {count} times: {count} images, but a {self.name} model "
                f"takes {self.max_images} per prompt (families taking several: {several})"
            )

    def messages(self, question: str, history: Sequence[tuple[str, str]] = ()) -> list[dict]:
        """The chat messages of a conversation ending in a user turn that asks ``question``; the one image
        sits in the first user turn."""
        messages: list[dict] = []
        placed = False
        for role, text in (*history, ("user", question)):
            content: list[dict] = []
            if role == "user" and not placed:
                content.append({"type": "image"})
                placed = True
            content.append({"type": "text", "text": text})
            messages.append({"role": role, "content": content})
        return messages

    def fixed_image_tokens(self, processor: ProcessorMixin) -> int | None:
        """The number of tokens every image takes, when the family has one (then text rows are expanded when
        encoded); None when it depends on the image (then rows keep one placeholder until the batch's
        images are known, and the forward expands them against ``ImageInputs.tokens_per_image``)."""
        return None

    def image_tokens_for_size(self, processor: ProcessorMixin, width: int, height: int) -> int:
        """How many image tokens the processor gives an image of ``width`` x ``height`` pixels (no pixels
        needed: a record's length is judged from its image file's header). A fixed-count family's count."""
        n = self.fixed_image_tokens(processor)
        if n is None:
            raise ValueError(f"a {self.name} image's token count depends on its size, and the family does not say how")
        return n

    def expand_image_text(self, processor: ProcessorMixin, text: str) -> str:
        """The templated ``text`` with its image placeholder expanded as the processor's ``__call__`` does,
        for a fixed-count family: the image token repeated :meth:`fixed_image_tokens` times."""
        return text.replace(self.image_token(processor), self.image_token(processor) * self.fixed_image_tokens(processor))

    # --- images -----------------------------------------------------------------------------------------
    @abstractmethod
    def prepare_images(self, processor: ProcessorMixin, images: Sequence[Image.Image]) -> ImageInputs:
        """The processor's tensors for ``images`` (converted to RGB) and each one's token count."""

    @abstractmethod
    def forward_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       images: ImageInputs, image_index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward besides ids and mask: the images' tensors, and
        ``position_ids`` where misp must give them (families that compute their own, as M-RoPE does, get none)."""

    @abstractmethod
    def shared_images(self, model: nn.Module, images: ImageInputs, image_index: torch.Tensor | None) -> AbstractContextManager[None]:
        """Within this, the model's forward encodes the U distinct ``images`` once and gives row i the
        features of image ``image_index[i]``. Nothing to do when ``image_index`` is None (row i, image i)."""


    # --- prefix sharing (misp.models.prefix_sharing) ---------------------------------------------------
    def row_position_ids(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         images: ImageInputs, image_index: torch.Tensor | None) -> torch.Tensor:
        """The position ids the model gives each token of the unpacked rows (``[N, T]``; M-RoPE families
        ``[3, N, T]``): packed rows take each token's own, so a response's positions restart after its prefix."""
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def prefix_sharing_refusal(self, model: nn.Module, attention_mask: torch.Tensor) -> str | None:
        """Why a packed row with a block mask would not be exact for this model and these rows (None: it is).
        Only attention implementations that take an explicit 4-D mask can run it."""
        impl = attention_implementation(model)
        if impl not in ("sdpa", "eager"):
            return (f"{self.name} with attention implementation {impl!r} takes no 4-D block mask "
                    "(prefix sharing needs 'sdpa' or 'eager')")
        return None


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under peft and FSDP1 wrappers (whose forward signature is generic)."""
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
        else:
            return model


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation of the model's language model (its text config's, else its own)."""
    config = unwrapped(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)


def accepts(model: nn.Module, name: str) -> bool:
    """Whether the transformers model's forward takes the keyword ``name`` (transformers releases differ)."""
    return name in inspect.signature(model.forward).parameters
