"""A word-level tokenizer for the tiny Shapes LLaVA, built offline from a closed vocabulary.

The Shapes world speaks a small closed language, so one token per word keeps the tiny language model
small and makes every token interpretable. The tokenizer is a real ``PreTrainedTokenizerFast`` (backed
by the ``tokenizers`` library), so it goes through the same ``LlavaProcessor``, ``save_pretrained`` and
``from_pretrained`` code as the Llama tokenizer of llava-hf/llava-1.5-7b-hf.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

# The words of the LLaVA-1.5 template "USER: <image>\n{prompt} ASSISTANT:", lowercased like all input.
TEMPLATE_WORDS = ("user", ":", "assistant")


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Whitespace separates words; every punctuation mark is a word of its own ("circle." -> "circle", ".").
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A lowercasing word-level tokenizer over ``words`` plus the special and template tokens.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``<image>`` 4, then ``user``, ``:``,
    ``assistant``, then the words in first-seen order (lowercased, duplicates dropped). Encoding adds
    ``<s>`` in front, as the Llama tokenizer of LLaVA-1.5 does; words outside the vocabulary become
    ``<unk>``.

    Args:
        words: the vocabulary, e.g. a Shapes world's ``world.json`` ``"vocabulary"``. Each entry must be
            one token under the pre-tokeniser: a word without spaces or punctuation, or one punctuation mark.
    """
    pre = _pre_tokenizer()
    vocab: dict[str, int] = {}
    for w in (*SPECIAL_TOKENS, *TEMPLATE_WORDS):
        vocab.setdefault(w, len(vocab))
    for raw in words:
        if not isinstance(raw, str):
            raise TypeError(f"vocabulary entries must be strings, got {raw!r}")
        w = raw.lower()
        if w in SPECIAL_TOKENS:
            raise ValueError(f"vocabulary entry {raw!r} collides with a special token")
        pieces = [p for p, _ in pre.pre_tokenize_str(w)]
        if pieces != [w]:
            raise ValueError(
                f"vocabulary entry {raw!r} is not a single word: the tokenizer splits it into {pieces}; "
                "list words and punctuation marks separately"
            )
        vocab.setdefault(w, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    # normalized=False: the special tokens are matched verbatim, before lowercasing and splitting.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = vocab[BOS_TOKEN]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN],
        # Decoding joins words with spaces; the clean-up turns "circle ." back into "circle.".
        clean_up_tokenization_spaces=True,
    )


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """The ``"vocabulary"`` list of a Shapes world, given its folder or its ``world.json``."""
    from misp.world.generate import read_manifest

    p = Path(path)
    if p.is_dir():
        p = p / "world.json"
    try:
        # The version check matters here: a model built on another version's vocabulary trains silently wrong.
        data = read_manifest(p)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"vocabulary: {e}") from None
    vocab = data.get("vocabulary")
    if not isinstance(vocab, list) or not vocab:
        raise ValueError(f"vocabulary: {p} has no non-empty 'vocabulary' list")
    return vocab
