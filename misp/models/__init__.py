"""VLM and CLIP construction: pretrained paths of every supported family (``misp.models.families``), 4-bit,
LoRA, the tiny offline builders, prompting, the shared-image forward and generation."""

from misp.models.clip import (
    ClipBundle,
    ClipSpec,
    TinyClipConfig,
    build_tiny_clip,
    load_clip,
    save_clip,
    train_transform,
)
from misp.models.forward import vlm_logits
from misp.models.generation import generate
from misp.models.prompting import (
    IGNORE_INDEX,
    collate_examples,
    encode_example,
    format_prompt,
    num_image_tokens,
    prepare_images,
    preprocess_images,
)
from misp.models.tokenizer import build_word_tokenizer, read_vocabulary
from misp.models.vlm import LoraSpec, VLMSpec, load_vlm, merged_state_dict, save_vlm
from misp.testing.tiny_llava import TinyLlavaConfig, build_tiny_llava

__all__ = [
    "IGNORE_INDEX",
    "ClipBundle",
    "ClipSpec",
    "LoraSpec",
    "TinyClipConfig",
    "TinyLlavaConfig",
    "VLMSpec",
    "build_tiny_clip",
    "build_tiny_llava",
    "build_word_tokenizer",
    "collate_examples",
    "encode_example",
    "format_prompt",
    "generate",
    "load_clip",
    "load_vlm",
    "merged_state_dict",
    "num_image_tokens",
    "prepare_images",
    "preprocess_images",
    "read_vocabulary",
    "save_clip",
    "save_vlm",
    "train_transform",
    "vlm_logits",
]
