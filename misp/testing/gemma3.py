"""A randomly initialised Gemma 3 (image-text) in the real architecture and the hub's file layout, built offline.

``build_gemma3`` makes a ``Gemma3ForConditionalGeneration`` and ``Gemma3Processor`` configured as
``google/gemma-3-4b-it`` is: a SigLIP vision tower whose patch features are average-pooled to a fixed
number of image tokens per image (256 there; ``Gemma3Sizes.image_tokens`` here) and projected; a Gemma 3
decoder (GQA, QK-norm, alternating sliding-window and global layers, tied embeddings); images attend
to each other bidirectionally (``token_type_ids``); the processor writes ``<start_of_image>`` in the chat
template and expands it into ``\\n\\n<start_of_image>`` + the image tokens + ``<end_of_image>\\n\\n``; a
Gemma-style BPE tokenizer with byte fallback; the hub's chat template (``<start_of_turn>user`` /
``model``). Only the sizes are free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    GemmaTokenizer,
)
from transformers.image_utils import PILImageResampling

from misp.testing.llava15 import _corpus, seeded_model

HUB_REPO_ID = "google/gemma-3-4b-it"
"""The hub id of the model this module stands in for."""

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- else -%}{%- set first_user_prefix = "
    "messages[0]['content'][0]['text'] + '\\n\\n' -%}{%- endif -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = "
    "message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first "
    "else \"\") }}{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- elif "
    "message['content'] is iterable -%}{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)
"""The chat template of google/gemma-3-4b-it."""


@dataclass
class Gemma3Sizes:
    """Sizes of the Gemma 3 architecture; tiny defaults (64 px images in 8 px patches, pooled to 16 image
    tokens per image; gemma-3-4b-it: 896 px, 14 px patches, 256 tokens)."""

    image_size: int = 64
    """Side of the square model input (4b: 896)."""
    patch_size: int = 8
    """Side of a vision patch (4b: 14)."""
    image_tokens: int = 16
    """Image tokens per image after average pooling, a square number (4b: 256)."""
    vision_hidden_size: int = 64
    """Width of the SigLIP tower (4b: 1152)."""
    vision_intermediate_size: int = 128
    """Hidden size of the vision MLP (4b: 4304)."""
    vision_layers: int = 2
    """Vision layers (4b: 27)."""
    vision_heads: int = 2
    """Vision attention heads (4b: 16)."""
    text_hidden_size: int = 64
    """Width of the decoder (4b: 2560)."""
    text_intermediate_size: int = 128
    """Hidden size of the decoder's gated MLP (4b: 10240)."""
    text_layers: int = 2
    """Decoder layers (4b: 34); the last is global, the others sliding-window as in the 5:1 pattern."""
    text_heads: int = 2
    """Attention heads (4b: 8)."""
    text_kv_heads: int = 1
    """Key/value heads (4b: 4)."""
    tokenizer_vocab_size: int = 600
    """Base vocabulary of the BPE tokenizer learned offline (specials, 256 bytes, merges)."""


def build_gemma_tokenizer(vocab_size: int = 600) -> GemmaTokenizer:
    """A Gemma-style BPE tokenizer with byte fallback trained offline: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
    ``<unk>`` 3, ``<mask>`` 4, the byte tokens, the learned pieces, then the turn and image tokens."""
    n_learned = vocab_size - len(SPECIALS) - 256
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer_tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=n_learned, show_progress=False))
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens={
        "boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE, "start_of_turn": TURN_TOKENS[0],
        "end_of_turn": TURN_TOKENS[1]})
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in (*TURN_TOKENS, BOI, EOI, IMAGE)],
                         special_tokens=True)
    return tokenizer


def build_gemma3_processor(sizes: Gemma3Sizes | None = None) -> Gemma3Processor:
    """The processor of google/gemma-3-4b-it over ``build_gemma_tokenizer`` (resize to a square, rescale,
    normalise to [-1, 1]; no pan and scan)."""
    sizes = sizes or Gemma3Sizes()
    image_processor = Gemma3ImageProcessor(
        do_resize=True, size={"height": sizes.image_size, "width": sizes.image_size},
        resample=PILImageResampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_pan_and_scan=False,
    )
    return Gemma3Processor(image_processor=image_processor, tokenizer=build_gemma_tokenizer(sizes.tokenizer_vocab_size),
                           chat_template=CHAT_TEMPLATE, image_seq_length=sizes.image_tokens)


def gemma3_config(sizes: Gemma3Sizes, tokenizer: GemmaTokenizer) -> Gemma3Config:
    """The ``Gemma3Config`` of google/gemma-3-4b-it with ``sizes`` and the tokenizer's ids."""
    head_dim = sizes.text_hidden_size // sizes.text_heads
    text = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=sizes.text_hidden_size,
        intermediate_size=sizes.text_intermediate_size, num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads, num_key_value_heads=sizes.text_kv_heads, head_dim=head_dim,
        query_pre_attn_scalar=head_dim, sliding_window=1024,
        layer_types=["sliding_attention"] * (sizes.text_layers - 1) + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        max_position_embeddings=131072,
    )
    vision = dict(
        model_type="siglip_vision_model", hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_intermediate_size, num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads, image_size=sizes.image_size, patch_size=sizes.patch_size,
        vision_use_head=False,
    )
    ids = tokenizer.convert_tokens_to_ids
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=sizes.image_tokens,
                        boi_token_index=ids(BOI), eoi_token_index=ids(EOI), image_token_index=ids(IMAGE))


def build_gemma3(
    sizes: Gemma3Sizes | None = None, seed: int = 0, device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """A freshly initialised Gemma 3 (transformers' init, seeded) and its processor, the model in eval mode."""
    sizes = sizes or Gemma3Sizes()
    processor = build_gemma3_processor(sizes)
    tok = processor.tokenizer
    model = seeded_model(Gemma3ForConditionalGeneration, gemma3_config(sizes, tok), seed, device, dtype)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gen.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    return model, processor


def save_gemma3_hub_files(model, processor, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB") -> Path:
    """Write the files of the google/gemma-3-4b-it repo for ``model`` and ``processor``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.save_pretrained(out)
    return out
