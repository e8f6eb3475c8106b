"""A tiny, randomly initialised LLaVA-1.5 built offline: the Shapes world's stand-in for LLaVA-1.5-7B.

It is a real ``transformers`` ``LlavaForConditionalGeneration`` (a CLIP vision tower, the two-layer GELU
projector, a Llama language model) with a real ``LlavaProcessor``, configured as
llava-hf/llava-1.5-7b-hf is: the second-to-last vision layer without its CLS token feeds the projector,
and the processor expands ``<image>`` into one token per patch. Only the sizes differ, so every code path
(prompting, the image-feature scatter, 4-bit loading, LoRA, generation) is the one the 7B model takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from misp.models.clip_vision import load_clip_vision
from misp.models.tokenizer import IMAGE_TOKEN, build_word_tokenizer


@dataclass
class TinyLlavaConfig:
    """Sizes of the tiny LLaVA (defaults: about 0.5M parameters, a 64x64 image becomes 64 image tokens)."""

    image_size: int = 64
    """Side of the square input image in pixels (images are resized and centre-cropped to it)."""
    patch_size: int = 8
    """Side of a vision patch in pixels; the image gives (image_size / patch_size)^2 image tokens."""
    vision_hidden_size: int = 64
    """Width of the CLIP vision transformer."""
    vision_layers: int = 2
    """Number of vision transformer layers (features come from the second-to-last, as in LLaVA-1.5)."""
    vision_heads: int = 4
    """Attention heads of the vision transformer."""
    text_hidden_size: int = 128
    """Width of the Llama language model."""
    text_layers: int = 2
    """Number of Llama decoder layers."""
    text_heads: int = 4
    """Attention heads of the language model."""
    text_intermediate_size: int = 256
    """Hidden size of the language model's SwiGLU MLP."""
    max_position_embeddings: int = 512
    """Longest sequence (image tokens included) the language model is configured for."""
    seed: int = 0
    """Seed of the random initialisation; the same seed and vocabulary give the same weights."""
    vision_init: str | None = None
    """A CLIP saved by ``save_clip`` (the Shapes CLIP stage's export) whose image tower becomes the vision
    tower, as LLaVA starts from a pretrained CLIP; its sizes then override the vision_* fields above."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_hidden_size", "vision_layers", "vision_heads",
                     "text_hidden_size", "text_layers", "text_heads", "text_intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyLlavaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"vision_hidden_size {self.vision_hidden_size} is not divisible by vision_heads {self.vision_heads}")
        if self.text_hidden_size % self.text_heads:
            raise ValueError(f"text_hidden_size {self.text_hidden_size} is not divisible by text_heads {self.text_heads}")
        if self.vision_layers < 2:
            # LLaVA-1.5 reads the second-to-last vision layer; with one layer that is the patch embedding.
            raise ValueError("vision_layers must be at least 2 (features come from the second-to-last layer)")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: one per patch (the CLS token is dropped, strategy 'default')."""
        return (self.image_size // self.patch_size) ** 2


def build_tiny_llava(
    words: Iterable[str], config: TinyLlavaConfig | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised tiny LLaVA and its processor over a word-level tokenizer of ``words``.

    Args:
        words: the tokenizer vocabulary (a Shapes world's ``world.json`` ``"vocabulary"``).
        config: the sizes; the defaults when omitted.

    Returns:
        ``(model, processor)``: the model in float32 and eval mode, ready for ``save_pretrained``.
    """
    config = config or TinyLlavaConfig()
    tokenizer = build_word_tokenizer(words)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision_weights = None
    if config.vision_init is not None:
        vision_kwargs, vision_weights = load_clip_vision(config.vision_init)
        config = replace(config, image_size=vision_kwargs["image_size"], patch_size=vision_kwargs["patch_size"],
                         vision_hidden_size=vision_kwargs["hidden_size"],
                         vision_layers=vision_kwargs["num_hidden_layers"],
                         vision_heads=vision_kwargs["num_attention_heads"])
    else:
        vision_kwargs = dict(
            hidden_size=config.vision_hidden_size,
            intermediate_size=4 * config.vision_hidden_size,
            num_hidden_layers=config.vision_layers,
            num_attention_heads=config.vision_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            projection_dim=config.vision_hidden_size,
        )
    vision = CLIPVisionConfig(**vision_kwargs)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden_size,
        intermediate_size=config.text_intermediate_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=config.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=config.num_image_tokens,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    # A private RNG stream: building a model must not move the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlavaForConditionalGeneration(llava)
    if vision_weights is not None:
        tower = model.model.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a CLIPVisionTransformer
        missing, unexpected = tower.load_state_dict(vision_weights, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise ValueError(f"vision_init: weights do not fit the vision tower (missing {missing}, unexpected {unexpected})")
    model.eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        resample=PILImageResampling.BICUBIC,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        # The CLIP CLS token, counted then dropped by 'default': as in llava-hf/llava-1.5-7b-hf.
        num_additional_image_tokens=1,
    )
    return model, processor
