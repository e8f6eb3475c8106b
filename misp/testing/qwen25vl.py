"""A randomly initialised Qwen2.5-VL in the real architecture and the hub's file layout, built offline.

``build_qwen25vl`` makes a ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2_5_VLProcessor`` from
transformers' own classes, configured as ``Qwen/Qwen2.5-VL-7B-Instruct`` is: a ViT with 14 px patches,
2-frame temporal patches, windowed attention with full-attention blocks, and a 2x2 patch merger; a
Qwen2 decoder with grouped-query attention and M-RoPE (3-D positions from the image grid); dynamic
resolution (the image keeps its aspect ratio, rounded to 28 px, bounded by min_pixels/max_pixels, so the
number of image tokens depends on the image size); a byte-level BPE tokenizer with Qwen's special tokens
and the hub's chat template (with its default system message). Only the sizes are free.
``save_qwen25vl_hub_files`` writes the hub repo's files, so ``AutoModelForImageTextToText`` and
``AutoProcessor`` load the folder exactly as a download of the 7B model.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from misp.testing.hub_cache import publish_snapshot
from misp.testing.llava15 import _corpus, seeded_model

HUB_REPO_ID = "Qwen/Qwen2.5-VL-7B-Instruct"
"""The hub id of the model this module stands in for."""

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
"""Qwen2.5-VL's added tokens, in the hub's order (151643 ... 151656 there)."""

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string "
    "%}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if "
    "content['type'] == 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = "
    "image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif "
    "%}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content "
    "%}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value "
    "}}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ "
    "content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt "
    "%}<|im_start|>assistant\n{% endif %}"
)
"""The chat template of Qwen/Qwen2.5-VL-7B-Instruct (its ``chat_template.json``)."""


@dataclass
class Qwen25VLSizes:
    """Sizes of the Qwen2.5-VL architecture; defaults are tiny but keep the real image geometry (14 px
    patches, 2x2 merge, 2-frame temporal patches, 112 px attention windows), so a 56x56 image gives 4
    image tokens and an 84x56 one 6. Widths are multiples of 64 so that bitsandbytes' CPU kernels take
    every linear layer of the language model."""

    vision_hidden_size: int = 64
    """Width of the vision transformer (7B: 1280)."""
    vision_intermediate_size: int = 128
    """Hidden size of the vision SwiGLU MLP (7B: 3420)."""
    vision_layers: int = 2
    """Vision blocks (7B: 32); the last one attends over the whole image, the others within windows."""
    vision_heads: int = 2
    """Vision attention heads (7B: 16)."""
    text_hidden_size: int = 64
    """Width of the Qwen2 decoder (7B: 3584, 3B: 2048)."""
    text_intermediate_size: int = 128
    """Hidden size of the decoder's SwiGLU MLP (7B: 18944, 3B: 11008)."""
    text_layers: int = 2
    """Decoder layers (7B: 28, 3B: 36)."""
    text_heads: int = 2
    """Attention heads (7B: 28, 3B: 16); the head width is text_hidden_size / text_heads."""
    text_kv_heads: int = 1
    """Key/value heads of grouped-query attention (7B: 4, 3B: 2)."""
    tokenizer_vocab_size: int = 600
    """Byte-level BPE vocabulary learned offline (256 bytes plus merges), before the special tokens."""
    min_pixels: int = 56 * 56
    """Smallest image area after resizing (the hub's 3136)."""
    max_pixels: int = 28 * 28 * 64
    """Largest image area after resizing (the hub's 12845056; tiny here so that tests stay small)."""
    vocab_size: int | None = None
    """Embedding rows; None rounds the tokenizer's size up to a multiple of 64. 152064 gives the embedding
    and LM head the 7B's size."""

    @classmethod
    def real_width(cls, text_layers: int = 2, vision_layers: int = 2) -> Qwen25VLSizes:
        """Qwen2.5-VL-7B's widths (3584-wide decoder with 28 heads and 4 key/value heads, 18944 MLP, 152064
        embedding rows; 1280-wide vision tower, 16 heads, 3420 MLP) with few layers, and configs/qwen25vl.yaml's
        pixel bounds (256 to 1280 image tokens)."""
        return cls(vision_hidden_size=1280, vision_intermediate_size=3420, vision_layers=vision_layers,
                   vision_heads=16, text_hidden_size=3584, text_intermediate_size=18944, text_layers=text_layers,
                   text_heads=28, text_kv_heads=4, vocab_size=152064, min_pixels=256 * 28 * 28,
                   max_pixels=1280 * 28 * 28)

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.text_hidden_size // self.text_heads

    def mrope_section(self) -> list[int]:
        """M-RoPE's split of the head's rotary frequencies over (time, height, width), in the 7B's
        proportions (16, 24, 24 of 64)."""
        half = self.head_dim // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


def build_qwen2_tokenizer(vocab_size: int = 600) -> Qwen2Tokenizer:
    """A Qwen2-style byte-level BPE tokenizer trained offline on a small built-in corpus, with Qwen2.5-VL's
    special tokens added after the learned vocabulary (as in the hub's tokenizer) and ``<|im_end|>`` as EOS,
    ``<|endoftext|>`` as padding, as the instruct model has them."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer_tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=learned["vocab"], merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", add_prefix_space=False,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.padding_side = "right"
    return tokenizer


def build_qwen25vl_processor(sizes: Qwen25VLSizes | None = None) -> Qwen2_5_VLProcessor:
    """The processor of Qwen/Qwen2.5-VL-7B-Instruct over ``build_qwen2_tokenizer`` (dynamic resolution
    bounded by ``sizes.min_pixels`` / ``max_pixels``, CLIP normalisation, the hub's chat template)."""
    from transformers import Qwen2VLVideoProcessor

    sizes = sizes or Qwen25VLSizes()
    image_processor = Qwen2VLImageProcessor(
        do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
        min_pixels=sizes.min_pixels, max_pixels=sizes.max_pixels, patch_size=14, temporal_patch_size=2,
        merge_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=sizes.min_pixels, max_pixels=sizes.max_pixels, patch_size=14, temporal_patch_size=2, merge_size=2,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=build_qwen2_tokenizer(sizes.tokenizer_vocab_size),
        video_processor=video_processor, chat_template=CHAT_TEMPLATE,
    )


def qwen25vl_config(sizes: Qwen25VLSizes, tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """The ``Qwen2_5_VLConfig`` of Qwen/Qwen2.5-VL-7B-Instruct with ``sizes`` and the tokenizer's ids."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = sizes.vocab_size or -(-len(tokenizer) // 64) * 64  # the hub pads the rows (151665 tokens -> 152064)
    text = dict(
        vocab_size=vocab, hidden_size=sizes.text_hidden_size, intermediate_size=sizes.text_intermediate_size,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_kv_heads, hidden_act="silu", max_position_embeddings=128000,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=sizes.text_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sizes.mrope_section()},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False,
    )
    vision = dict(
        depth=sizes.vision_layers, hidden_size=sizes.vision_hidden_size, hidden_act="silu",
        intermediate_size=sizes.vision_intermediate_size, num_heads=sizes.vision_heads, in_channels=3,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
        out_hidden_size=sizes.text_hidden_size, fullatt_block_indexes=[sizes.vision_layers - 1],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def build_qwen25vl(
    sizes: Qwen25VLSizes | None = None, seed: int = 0, device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """A freshly initialised Qwen2.5-VL (transformers' init, seeded) and its processor, the model in eval mode."""
    sizes = sizes or Qwen25VLSizes()
    processor = build_qwen25vl_processor(sizes)
    tok = processor.tokenizer
    config = qwen25vl_config(sizes, tok)
    model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed, device, dtype)
    gen = model.generation_config
    gen.bos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    gen.eos_token_id = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    gen.pad_token_id = tok.pad_token_id
    return model, processor


def save_qwen25vl_hub_files(
    model: Qwen2_5_VLForConditionalGeneration, processor: Qwen2_5_VLProcessor, out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the files of the Qwen/Qwen2.5-VL-7B-Instruct repo for ``model`` and ``processor``: sharded
    safetensors with their index, ``config.json``, ``generation_config.json``, ``preprocessor_config.json``,
    ``chat_template.json`` and the tokenizer's ``tokenizer.json`` / ``tokenizer_config.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.image_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n")
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        cfg = json.loads((out / name).read_text())
        cfg["processor_class"] = "Qwen2_5_VLProcessor"
        (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def write_qwen25vl_hub_cache(
    cache_dir: str | os.PathLike, sizes: Qwen25VLSizes | None = None, seed: int = 0, repo_id: str = HUB_REPO_ID,
    max_shard_size: int | str = "300KB",
) -> Path:
    """A tiny random Qwen2.5-VL stored in the hub cache ``cache_dir`` as the ``main`` snapshot of ``repo_id``,
    so that with ``misp.testing.hub_cache.hub_cache_env(cache_dir)`` a config naming
    ``Qwen/Qwen2.5-VL-7B-Instruct`` (or the 3B, with ``repo_id`` set so) loads it unchanged. Its widths are
    multiples of 64, so 4-bit nf4 loading works on the CPU too. Returns the snapshot folder."""
    model, processor = build_qwen25vl(sizes, seed=seed)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=cache_dir) as tmp:
        save_qwen25vl_hub_files(model, processor, tmp, max_shard_size=max_shard_size)
        return publish_snapshot(tmp, cache_dir, repo_id)
