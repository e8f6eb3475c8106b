"""A randomly initialised Qwen3-VL in the real architecture and the hub's file layout, built offline.

``build_qwen3vl`` makes a ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLProcessor`` configured as
``Qwen/Qwen3-VL-8B-Instruct`` is: a ViT with 16 px patches, learned position embeddings interpolated to
the image grid, a 2x2 patch merger and DeepStack (features of intermediate vision layers added to the
first decoder layers' hidden states); a Qwen3 decoder (QK-norm, grouped-query attention) with interleaved
M-RoPE; dynamic resolution (32 px units, bounded by ``min_pixels`` / ``max_pixels``); Qwen's byte-level
tokenizer and special tokens. Only the sizes are free. The chat template is the hub's for a conversation
of text and images (no default system message; the tool-calling branches are left out).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from misp.testing.hub_cache import publish_snapshot
from misp.testing.llava15 import seeded_model
from misp.testing.qwen25vl import SPECIAL_TOKENS, build_qwen2_tokenizer

HUB_REPO_ID = "Qwen/Qwen3-VL-8B-Instruct"
"""The hub id of the model this module stands in for."""

CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}{%- if content.type == 'image' or 'image' in content or "
    "'image_url' in content %}{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen3-VL-Instruct's chat template for system, user and assistant turns of text and images."""


@dataclass
class Qwen3VLSizes:
    """Sizes of the Qwen3-VL architecture; tiny defaults with the real image geometry (16 px patches, 2x2
    merge: a 64x64 image gives 4 image tokens) and DeepStack from two of the three vision layers."""

    vision_hidden_size: int = 64
    """Width of the vision transformer (8B: 1152)."""
    vision_intermediate_size: int = 128
    """Hidden size of the vision MLP (8B: 4304)."""
    vision_layers: int = 3
    """Vision blocks (8B: 27)."""
    vision_heads: int = 2
    """Vision attention heads (8B: 16)."""
    deepstack_layers: tuple[int, ...] = (0, 1)
    """Vision layers whose merged features are added to the first decoder layers (8B: 8, 16, 24)."""
    text_hidden_size: int = 64
    """Width of the Qwen3 decoder (8B: 4096)."""
    text_intermediate_size: int = 128
    """Hidden size of the decoder's SwiGLU MLP (8B: 12288)."""
    text_layers: int = 2
    """Decoder layers (8B: 36)."""
    text_heads: int = 2
    """Attention heads (8B: 32)."""
    text_kv_heads: int = 1
    """Key/value heads (8B: 8)."""
    tokenizer_vocab_size: int = 600
    """Byte-level BPE vocabulary learned offline, before the special tokens."""
    min_pixels: int = 64 * 64
    """Smallest image area after resizing (the hub's 65536)."""
    max_pixels: int = 32 * 32 * 32
    """Largest image area after resizing (the hub's 16777216; tiny here)."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.text_hidden_size // self.text_heads

    def mrope_section(self) -> list[int]:
        """Interleaved M-RoPE's frequencies for (time, height, width), in the 8B's proportions (24, 20, 20)."""
        half = self.head_dim // 2
        h = (half * 20) // 64
        return [half - 2 * h, h, h]


def build_qwen3vl_processor(sizes: Qwen3VLSizes | None = None) -> Qwen3VLProcessor:
    """The processor of Qwen/Qwen3-VL-8B-Instruct over Qwen's tokenizer (dynamic resolution in 32 px units)."""
    from transformers import Qwen3VLVideoProcessor

    sizes = sizes or Qwen3VLSizes()
    bounds = {"shortest_edge": sizes.min_pixels, "longest_edge": sizes.max_pixels}
    image_processor = Qwen2VLImageProcessor(
        do_resize=True, size=bounds, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, patch_size=16,
        temporal_patch_size=2, merge_size=2,
    )
    video_processor = Qwen3VLVideoProcessor(size=bounds, patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=build_qwen2_tokenizer(sizes.tokenizer_vocab_size),
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def qwen3vl_config(sizes: Qwen3VLSizes, tokenizer) -> Qwen3VLConfig:
    """The ``Qwen3VLConfig`` of Qwen/Qwen3-VL-8B-Instruct with ``sizes`` and the tokenizer's ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=sizes.text_hidden_size,
        intermediate_size=sizes.text_intermediate_size, num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads, num_key_value_heads=sizes.text_kv_heads, head_dim=sizes.head_dim,
        hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": sizes.mrope_section(),
                         "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False,
    )
    vision = dict(
        depth=sizes.vision_layers, hidden_size=sizes.vision_hidden_size, hidden_act="gelu_pytorch_tanh",
        intermediate_size=sizes.vision_intermediate_size, num_heads=sizes.vision_heads, in_channels=3,
        patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=sizes.text_hidden_size,
        num_position_embeddings=2304, deepstack_visual_indexes=list(sizes.deepstack_layers),
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def build_qwen3vl(
    sizes: Qwen3VLSizes | None = None, seed: int = 0, device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Qwen3VLForConditionalGeneration, Qwen3VLProcessor]:
    """A freshly initialised Qwen3-VL (transformers' init, seeded) and its processor, the model in eval mode."""
    sizes = sizes or Qwen3VLSizes()
    processor = build_qwen3vl_processor(sizes)
    tok = processor.tokenizer
    model = seeded_model(Qwen3VLForConditionalGeneration, qwen3vl_config(sizes, tok), seed, device, dtype)
    gen = model.generation_config
    gen.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    gen.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    gen.pad_token_id = tok.pad_token_id
    return model, processor


def save_qwen3vl_hub_files(model, processor, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write the files of the Qwen/Qwen3-VL-8B-Instruct repo for ``model`` and ``processor``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.image_processor.save_pretrained(out)
    processor.video_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n")
    for name in ("preprocessor_config.json", "tokenizer_config.json", "video_preprocessor_config.json"):
        if (out / name).is_file():
            cfg = json.loads((out / name).read_text())
            cfg["processor_class"] = "Qwen3VLProcessor"
            (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def write_qwen3vl_hub_cache(cache_dir: str | os.PathLike, sizes: Qwen3VLSizes | None = None, seed: int = 0,
                            repo_id: str = HUB_REPO_ID) -> Path:
    """A tiny random Qwen3-VL stored in the hub cache ``cache_dir`` as ``repo_id``; returns the snapshot."""
    model, processor = build_qwen3vl(sizes, seed=seed)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=cache_dir) as tmp:
        save_qwen3vl_hub_files(model, processor, tmp, max_shard_size="300KB")
        return publish_snapshot(tmp, cache_dir, repo_id)
