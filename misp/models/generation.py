"""Batched answer generation with a VLM of any registered family, in the family's own template (the same
templating and tokenisation as training), for evaluation and ``misp prefs``."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm
from transformers import ProcessorMixin

from misp.models.families import family_for_processor
from misp.models.families.base import IMAGE_MARKER
from misp.models.forward import expand_image_rows
from misp.models.prompting import collate_examples, encode_example, prepare_images


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def generate(
    model: nn.Module,
    processor: ProcessorMixin,
    images: list[Image.Image | list[Image.Image]],
    prompts: list[str],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
    stop_token_ids: list[int] | None = None,
) -> list[list[str]]:
    """Answers to ``prompts`` about ``images``: one list of ``num_return_sequences`` strings per input.

    Prompts are templated for the processor's family by ``encode_example`` (the same tokenisation as
    training; a prompt templated for another family is re-templated), their image placeholder expanded for
    each image's token count, and left-padded into batches. Families that compute their own positions
    (Qwen2.5-VL's M-RoPE) get the inputs they compute them from. The answers are decoded without special tokens and without
    the prompt, stripped of surrounding whitespace. The model is put in eval mode for the call (dropout
    off) and its mode restored after.

    Args:
        model: a VLM of a registered family (plain, peft-wrapped or quantised).
        processor: its processor.
        images: one PIL image per prompt, or a list of them for a prompt holding as many ``<image>`` markers
            (families that take several images per prompt).
        prompts: the user questions, without the template.
        max_new_tokens: longest answer in tokens.
        do_sample: sample (True) or decode greedily (False, deterministic).
        temperature: softmax temperature when sampling.
        top_p: nucleus mass when sampling.
        num_return_sequences: answers per input.
        seed: seeds sampling (batch k uses ``seed + k``) so that the same seed and ``batch_size`` give the
            same answers; the caller's global random state is left untouched.
        batch_size: inputs per ``generate`` call.
        progress: show a tqdm bar over batches.
        stop_token_ids: tokens that end an answer (a family's end-of-turn tokens); None: the tokenizer's EOS.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one image per prompt")
    per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    for i, (ims, p) in enumerate(zip(per_prompt, prompts, strict=True)):
        if len(ims) != max(p.count(IMAGE_MARKER), 1):
            raise ValueError(f"prompt {i} holds {max(p.count(IMAGE_MARKER), 1)} image(s) but {len(ims)} were given: {p[:80]!r}")
    if batch_size < 1 or num_return_sequences < 1 or max_new_tokens < 1:
        raise ValueError("batch_size, num_return_sequences and max_new_tokens must be positive")
    if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 with greedy decoding returns copies; set do_sample=True")
    tokenizer = processor.tokenizer
    family = family_for_processor(processor)
    image_token_id = family.image_token_id(processor)
    encoded = [encode_example(processor, p) for p in prompts]
    device = _input_device(model)
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids or tokenizer.eos_token_id,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    rng_devices = [device] if device.type == "cuda" else []

    answers: list[list[str]] = []
    was_training = model.training
    model.eval()
    try:
        starts = range(0, len(prompts), batch_size)
        for k, start in enumerate(tqdm(starts, desc="generate", disable=not progress)):
            batch = collate_examples(encoded[start : start + batch_size], tokenizer.pad_token_id, padding_side="left")
            # The batch's images in row order (each row's in text order): one per image slot.
            flat = [im for ims in per_prompt[start : start + batch_size] for im in ims]
            prepared = prepare_images(processor, flat).to(device)
            ids, mask, _ = expand_image_rows(batch["input_ids"].to(device), batch["attention_mask"].to(device), None,
                                             image_token_id, prepared.tokens_per_image)
            inputs = family.forward_inputs(model, ids, mask, prepared, None)
            inputs.pop("position_ids", None)  # generate counts positions over the mask itself, step by step
            with torch.random.fork_rng(devices=rng_devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed + k)
                out = model.generate(input_ids=ids, attention_mask=mask, **inputs, **kwargs)
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            texts = [t.strip() for t in texts]
            answers.extend(texts[i : i + num_return_sequences] for i in range(0, len(texts), num_return_sequences))
    finally:
        model.train(was_training)
    return answers
