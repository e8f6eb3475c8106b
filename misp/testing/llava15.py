"""A randomly initialised LLaVA-1.5 in the real architecture and the hub's file layout, built offline.

``build_llava15`` makes a ``LlavaForConditionalGeneration`` and ``LlavaProcessor`` from transformers' own
classes with everything configured as ``llava-hf/llava-1.5-7b-hf`` has it (a 336 px CLIP vision tower
with 14 px patches, so 576 image tokens; features from its second-to-last layer without CLS; the two-layer
GELU projector; a Llama decoder with SiLU MLP and RMSNorm; a Llama BPE tokenizer with byte fallback in
which ``<image>`` and ``<pad>`` follow the base vocabulary; the hub's CLIP preprocessing and chat
template). Only the sizes are free: tiny by default for CPU tests, ``Llava15Sizes.real_width()`` for a
GPU check at the 7B model's width. ``write_hub_cache`` stores it where and how a download of
``llava-hf/llava-1.5-7b-hf`` would be, so ``from_pretrained("llava-hf/llava-1.5-7b-hf")`` finds it offline.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from misp.models.families.llava import CHAT_TEMPLATE  # noqa: F401  (the hub's, re-exported)
from misp.testing.hub_cache import publish_snapshot

HUB_REPO_ID = "llava-hf/llava-1.5-7b-hf"
"""The hub id of the model this module stands in for."""

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"


_EMBEDDING_MULTIPLE = 64  # the hub pads 32000 + <image> + <pad> = 32002 embedding rows to 32064
_N_BYTE_TOKENS = 256
_N_SPECIAL = 3  # <unk>, <s>, </s> at ids 0, 1, 2 as in Llama's vocabulary


@dataclass
class Llava15Sizes:
    """Sizes of the LLaVA-1.5 architecture; defaults are tiny (about 0.3M parameters) but keep the real
    image geometry (336 px, 14 px patches: 576 image tokens). Widths are multiples of 64 so that
    bitsandbytes' CPU 4-bit kernels take every linear layer."""

    image_size: int = 336
    """Side of the square model input in pixels (LLaVA-1.5: 336)."""
    patch_size: int = 14
    """Side of a vision patch in pixels (LLaVA-1.5: 14); image tokens = (image_size / patch_size)^2."""
    vision_hidden_size: int = 64
    """Width of the CLIP vision transformer (ViT-L/14: 1024)."""
    vision_intermediate_size: int = 256
    """Hidden size of the vision MLP (ViT-L/14: 4096)."""
    vision_layers: int = 2
    """Vision transformer layers (ViT-L/14: 24); at least 2, as features come from the second-to-last."""
    vision_heads: int = 2
    """Vision attention heads (ViT-L/14: 16)."""
    text_hidden_size: int = 64
    """Width of the Llama decoder (7B: 4096)."""
    text_intermediate_size: int = 128
    """Hidden size of the SwiGLU MLP (7B: 11008)."""
    text_layers: int = 2
    """Llama decoder layers (7B: 32)."""
    text_heads: int = 2
    """Attention heads, without grouped-query attention (7B: 32)."""
    tokenizer_vocab_size: int = 512
    """Base vocabulary of the BPE tokenizer trained offline: 3 specials, 256 byte-fallback tokens, then
    learned pieces (at most this many in all; fewer when the built-in corpus runs out of merges)."""
    vocab_size: int | None = None
    """Embedding rows; None rounds base vocabulary + <image> + <pad> up to a multiple of 64, as the hub
    model does (32002 -> 32064). Set 32064 to give the embedding and LM head their real size."""
    max_position_embeddings: int = 4096
    """Context length the decoder is configured for (7B: 4096)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "vision_hidden_size", "vision_intermediate_size",
                     "vision_heads", "text_hidden_size", "text_intermediate_size", "text_layers", "text_heads",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"Llava15Sizes.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_hidden_size % self.vision_heads or self.text_hidden_size % self.text_heads:
            raise ValueError("vision_hidden_size and text_hidden_size must be divisible by their head counts")
        if self.vision_layers < 2:
            raise ValueError("vision_layers must be at least 2 (features come from the second-to-last layer)")
        if self.tokenizer_vocab_size <= _N_SPECIAL + _N_BYTE_TOKENS:
            raise ValueError(f"tokenizer_vocab_size must exceed {_N_SPECIAL + _N_BYTE_TOKENS} (specials and bytes)")

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image: one per patch (CLS is dropped by the 'default' strategy)."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def real_width(cls, text_layers: int = 2, vision_layers: int = 2) -> Llava15Sizes:
        """LLaVA-1.5-7B's widths (ViT-L/14-336 tower, Vicuna-7B decoder, 32064 embedding rows) with few layers."""
        return cls(vision_hidden_size=1024, vision_intermediate_size=4096, vision_layers=vision_layers,
                   vision_heads=16, text_hidden_size=4096, text_intermediate_size=11008, text_layers=text_layers,
                   text_heads=32, vocab_size=32064)


def _corpus() -> list[str]:
    """A small built-in English corpus in LLaVA's register: the prompts misp sends and Shapes-like answers."""
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "brown"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "rectangle", "cross", "diamond"]
    places = ["top left", "top right", "bottom left", "bottom right", "center", "left side", "right side"]
    objects = ["person", "dog", "cat", "car", "table", "chair", "tree", "bus", "bicycle", "cup", "bird", "horse"]
    lines = [
        "USER: Please describe this image in detail. ASSISTANT:",
        "Answer the question using a single word or phrase.",
        "A chat between a curious user and an artificial intelligence assistant.",
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "Yes, there is. No, there is not. I don't know.",
    ]
    for i, obj in enumerate(objects):
        c, s, p = colors[i % len(colors)], shapes[i % len(shapes)], places[i % len(places)]
        lines += [
            f"USER: Is there a {obj} in the image? ASSISTANT: {'Yes' if i % 2 else 'No'}",
            f"The image shows a {c} {obj} standing near a {s} at the {p} of the picture.",
            f"In this photo, the {obj} is next to the {objects[(i + 3) % len(objects)]}, and the background is {c}.",
        ]
    for i, c in enumerate(colors):
        for j, s in enumerate(shapes):
            p = places[(i + j) % len(places)]
            size = ("small", "large", "medium")[(i * j) % 3]
            lines.append(f"There is a {size} {c} {s} at the {p}. It is {'above' if j % 2 else 'below'} the {shapes[(j + 1) % len(shapes)]}.")
    return lines


def build_llama_tokenizer(vocab_size: int = 512) -> LlamaTokenizer:
    """A Llama-style BPE tokenizer with byte fallback, trained offline on a small built-in corpus.

    The layout of Llama's vocabulary: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the byte tokens ``<0x00>`` ..
    ``<0xFF>`` at 3..258, then the learned pieces (``▁`` marks a word start); then, as added tokens as in
    llava-hf/llava-1.5-7b-hf, ``<image>`` and ``<pad>``. Encoding prepends ``<s>``; text outside the
    corpus falls back to bytes, never to ``<unk>``.

    Args:
        vocab_size: the base vocabulary size at most (before ``<image>`` and ``<pad>``).
    """
    n_learned = vocab_size - _N_SPECIAL - _N_BYTE_TOKENS
    if n_learned < 1:
        raise ValueError(f"vocab_size must exceed {_N_SPECIAL + _N_BYTE_TOKENS}, got {vocab_size}")
    # Train on whitespace-split words ("▁word"), as sentencepiece does for Llama, so no merge crosses a word.
    trainer_tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN, byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=n_learned, special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator(_corpus(), trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {UNK_TOKEN: 0, BOS_TOKEN: 1, EOS_TOKEN: 2}
    for b in range(_N_BYTE_TOKENS):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    # transformers' own class sets Llama's pipeline (Metaspace, byte-fallback decoder, <s> prefix).
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, unk_token=UNK_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        add_bos_token=True, add_eos_token=False, legacy=False, padding_side="left",
    )
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False),
                          AddedToken(PAD_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.pad_token = PAD_TOKEN
    return tokenizer


def build_llava15_processor(sizes: Llava15Sizes | None = None) -> LlavaProcessor:
    """The processor of llava-hf/llava-1.5-7b-hf over ``build_llama_tokenizer`` (CLIP preprocessing at
    ``sizes.image_size``: resize the short side, centre-crop, rescale by 1/255, normalise with CLIP's
    mean and std; ``<image>`` expands to one token per patch)."""
    sizes = sizes or Llava15Sizes()
    s = sizes.image_size
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": s}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": s, "width": s},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_llama_tokenizer(sizes.tokenizer_vocab_size),
        patch_size=sizes.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        # The vision tower's CLS token, counted and then dropped by the 'default' strategy.
        num_additional_image_tokens=1,
    )


def llava15_config(sizes: Llava15Sizes, image_token_id: int, pad_token_id: int) -> LlavaConfig:
    """The ``LlavaConfig`` of llava-hf/llava-1.5-7b-hf with ``sizes`` and the tokenizer's ids."""
    base = image_token_id  # <image> follows the base vocabulary, <pad> follows <image>
    vocab = sizes.vocab_size or -(-(base + 2) // _EMBEDDING_MULTIPLE) * _EMBEDDING_MULTIPLE
    if vocab <= max(image_token_id, pad_token_id):
        raise ValueError(f"vocab_size {vocab} has no row for <image> ({image_token_id}) or <pad> ({pad_token_id})")
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden_size, intermediate_size=sizes.vision_intermediate_size,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size, patch_size=sizes.patch_size,
        projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=sizes.text_hidden_size, intermediate_size=sizes.text_intermediate_size,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads, max_position_embeddings=sizes.max_position_embeddings,
        rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=sizes.num_image_tokens, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False,
    )


@contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    # Parameters are created directly in the target dtype: at real width a float32 copy first would
    # double the peak memory of construction.
    if dtype is None:
        yield
        return
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def seeded_model(model_class, config, seed: int = 0, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
    """``model_class(config)`` with transformers' initialisation under ``seed``, in a private RNG stream (so
    that building a model leaves the caller's random state alone), on ``device`` in ``dtype``, in eval mode."""
    device = torch.device(device or "cpu")
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), _default_dtype(dtype), device:
        torch.manual_seed(seed)
        model = model_class(config)
    return model.eval()


def build_llava15(
    sizes: Llava15Sizes | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A freshly initialised LLaVA-1.5 (transformers' init, seeded) and its processor.

    Args:
        sizes: the architecture's sizes; tiny by default, ``Llava15Sizes.real_width()`` for the 7B widths.
        seed: seed of the weights (the tokenizer is trained deterministically and does not depend on it).
        device: where the parameters are created (e.g. "cuda"); the CPU by default.
        dtype: the parameter dtype (e.g. torch.bfloat16); float32 by default.

    Returns:
        ``(model, processor)``, the model in eval mode.
    """
    sizes = sizes or Llava15Sizes()
    processor = build_llava15_processor(sizes)
    tok = processor.tokenizer
    config = llava15_config(sizes, tok.convert_tokens_to_ids(IMAGE_TOKEN), tok.pad_token_id)
    model = seeded_model(LlavaForConditionalGeneration, config, seed, device, dtype)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    return model, processor


def save_hub_files(
    model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str | os.PathLike,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the files of the llava-hf/llava-1.5-7b-hf repo for ``model`` and ``processor`` into ``out_dir``.

    The hub repo's layout, not the one ``processor.save_pretrained`` writes in transformers 5: sharded
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, ``config.json``,
    ``generation_config.json``, ``preprocessor_config.json`` (the image processor alone),
    ``processor_config.json`` (the processor's own settings), ``chat_template.json`` and the tokenizer's
    ``tokenizer.json`` / ``tokenizer_config.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    processor.image_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({
        "image_token": processor.image_token,
        "num_additional_image_tokens": processor.num_additional_image_tokens,
        "patch_size": processor.patch_size,
        "processor_class": "LlavaProcessor",
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
    }, indent=2) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}, indent=2) + "\n")
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        # The hub's files name the processor class, which AutoProcessor reads to choose LlavaProcessor.
        cfg = json.loads((out / name).read_text())
        cfg["processor_class"] = "LlavaProcessor"
        (out / name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


def write_hub_cache(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    cache_dir: str | os.PathLike,
    repo_id: str = HUB_REPO_ID,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Store ``model`` and ``processor`` in the hub cache ``cache_dir`` as the ``main`` snapshot of ``repo_id``.

    With ``HF_HUB_CACHE=<cache_dir>`` and ``HF_HUB_OFFLINE=1`` (``hub_cache_env``; in this process
    ``use_hub_cache``), ``LlavaForConditionalGeneration.from_pretrained(repo_id)``,
    ``AutoProcessor.from_pretrained(repo_id)`` and ``misp.models.vlm.load_vlm(VLMSpec(path=repo_id))`` load it.

    Args:
        model: the model (any dtype; saved as it is).
        processor: its processor.
        cache_dir: the hub cache root.
        repo_id: the repo to stand in for.
        max_shard_size: largest safetensors shard; pass a small one (e.g. "200KB") to get several shards
            from a tiny model, as the 7B checkpoint has.

    Returns:
        The snapshot folder.
    """
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    # Staged inside cache_dir so that publishing moves files on one file system.
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=cache_dir) as tmp:
        save_hub_files(model, processor, tmp, max_shard_size=max_shard_size)
        return publish_snapshot(tmp, cache_dir, repo_id)
