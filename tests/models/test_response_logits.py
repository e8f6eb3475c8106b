"""response_logits: the LM head only where a loss reads it, with the same log-probs and gradients."""

from __future__ import annotations

import random

import torch

from misp.logprobs import IGNORE_INDEX, sequence_logps
from misp.models.forward import positions_to_keep, response_logits, vlm_logits
from misp.models.prompting import collate_examples, encode_example
from misp.models.tiny_llava import TinyLlavaConfig, build_tiny_llava

WORDS = "a small large red blue circle square at the top bottom describe image is there in yes no".split() + [".", "?"]


def _rows(processor, n: int, seed: int = 0):
    rng = random.Random(seed)
    examples = [encode_example(processor, "describe the image .", " ".join(rng.choices(WORDS[:-2], k=rng.randint(1, 9))))
                for _ in range(n)]
    return collate_examples(examples, processor.tokenizer.pad_token_id)


def test_positions_to_keep_starts_before_the_earliest_scored_label():
    labels = torch.full((2, 10), IGNORE_INDEX)
    labels[0, 6:8] = 1
    labels[1, 4:9] = 2
    assert positions_to_keep(labels) == 10 - 3  # logit 3 predicts label 4, the earliest scored
    labels[1, 1] = 5
    assert positions_to_keep(labels) == 0  # logit 0 is read: keep all
    assert positions_to_keep(torch.full((2, 4), IGNORE_INDEX)) == 1


def test_response_logits_match_full_logits_in_value_and_gradient():
    torch.manual_seed(0)
    model, processor = build_tiny_llava(WORDS, TinyLlavaConfig(image_size=32, patch_size=8, vision_hidden_size=32,
                                                              vision_heads=2, text_hidden_size=64, text_heads=2,
                                                              text_intermediate_size=128))
    batch = _rows(processor, 4)
    pixels = torch.randn(2, 3, 32, 32)
    index = torch.tensor([0, 1, 1, 0])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def logps(trim: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if trim:
            logits, cut = response_logits(model, ids, mask, pixels, labels, index)
            assert logits.shape[1] == cut.shape[1] < ids.shape[1]  # the image and prompt positions are skipped
        else:
            logits, cut = vlm_logits(model, ids, mask, pixels, index), labels
        out = sequence_logps(logits, cut)
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, full_grads = logps(False)
    trimmed, trimmed_grads = logps(True)
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-5)
    assert len(full_grads) == len(trimmed_grads)
    for a, b in zip(full_grads, trimmed_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
