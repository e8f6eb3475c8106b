"""Per model family: each row's response log-probs and their gradients, computed by misp in one mixed batch
(images of different sizes, negatives of another size than the positive, images shared between rows),
equal a plain transformers forward of that row alone.

This is the test that catches position (M-RoPE), mask, image-token expansion and image-sharing errors:
the reference is the processor's own ``__call__`` on the row's text and image and the model's own forward,
with nothing of misp in between. Both models are loaded from hub-layout folders by ``load_vlm``, so the
family is found from ``config.json`` as for a real checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from misp.logprobs import sequence_logps
from misp.models.families import UnsupportedModelError, family_for_processor, family_of
from misp.models.forward import response_logits
from misp.models.prompting import collate_examples, encode_example, prepare_images
from misp.models.vlm import VLMSpec, load_vlm
from misp.testing.gemma3 import build_gemma3, save_gemma3_hub_files
from misp.testing.llava15 import build_llava15, save_hub_files
from misp.testing.qwen3vl import build_qwen3vl, save_qwen3vl_hub_files
from misp.testing.qwen25vl import build_qwen25vl, save_qwen25vl_hub_files

PROMPTS = ["What is in the image?", "Is there a red circle in the image?"]
# (prompt, response, image): chosen and rejected on the positive, the chosen on two negatives of other
# sizes, and a second prompt on a negative.
ROWS = [(0, "The image shows a red circle at the top left.", 0), (0, "There is a blue square.", 0),
        (0, "The image shows a red circle at the top left.", 1), (0, "The image shows a red circle at the top left.", 2),
        (1, "Yes, there is.", 1)]
WEIGHTS = torch.tensor([1.0, -0.5, 0.7, 0.3, -1.2])


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (96, 64), (128, 96)]  # dynamic-resolution families: three different token counts
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in sizes]


def _hub_folder(family: str, tmp_path):
    if family == "llava-1.5":
        model, processor = build_llava15()
        save_hub_files(model, processor, tmp_path)
    elif family == "qwen2.5-vl":
        model, processor = build_qwen25vl()
        save_qwen25vl_hub_files(model, processor, tmp_path, max_shard_size="200KB")
    elif family == "qwen3-vl":
        model, processor = build_qwen3vl()
        save_qwen3vl_hub_files(model, processor, tmp_path, max_shard_size="200KB")
    else:
        model, processor = build_gemma3()
        save_gemma3_hub_files(model, processor, tmp_path, max_shard_size="200KB")
    return tmp_path


def _plain_row_logp(model, processor, prompt: str, response: str, image: Image.Image) -> torch.Tensor:
    """The row's response log-prob from the processor's own call and the model's own forward."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    prompt_text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    sep = family_for_processor(processor).response_separator
    full_text = prompt_text + sep + response + processor.tokenizer.eos_token
    n_prompt = processor(text=[prompt_text], images=[[image]], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[full_text], images=[[image]], return_tensors="pt")
    logits = model(**inputs, use_cache=False).logits[0, :-1]
    targets = inputs["input_ids"][0, 1:]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    return logps[n_prompt - 1 :].sum()


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2.5-vl", "qwen3-vl", "gemma-3"])
def test_each_rows_logp_and_gradient_in_a_mixed_batch_equal_its_plain_forward(family, tmp_path):
    model, processor = load_vlm(VLMSpec(path=str(_hub_folder(family, tmp_path))))
    assert family_of(model).name == family
    model.eval()
    images = _images()

    # misp: one right-padded batch of the five rows, the three distinct images encoded once.
    examples = [encode_example(processor, PROMPTS[p], r) for p, r, _ in ROWS]
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    prepared = prepare_images(processor, images)
    if family.startswith("qwen"):
        assert len(set(prepared.tokens_per_image.tolist())) == 3  # dynamic resolution: one count per image
    index = torch.tensor([i for _, _, i in ROWS])
    model.zero_grad(set_to_none=True)
    logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], prepared, batch["labels"], index)
    misp_logps = sequence_logps(logits, labels)
    (WEIGHTS * misp_logps).sum().backward()
    misp_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # plain transformers, one row at a time, its own image alone.
    model.zero_grad(set_to_none=True)
    plain = []
    for (p, r, i), w in zip(ROWS, WEIGHTS, strict=True):
        logp = _plain_row_logp(model, processor, PROMPTS[p], r, images[i])
        (w * logp).backward()
        plain.append(logp.detach())
    plain_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(misp_logps.detach(), torch.stack(plain), rtol=1e-4, atol=1e-4)
    assert misp_grads.keys() == plain_grads.keys()
    assert any("visual" in n or "vision_tower" in n for n in misp_grads)  # the shared images' gradients too
    for name, grad in misp_grads.items():
        # Per tensor, relative to its size (float32 sums over rows and image tokens round differently when
        # batched: Gemma 3's projector gradient sums 5 rows x 16 tokens of large activations), with a floor
        # for gradients that are zero in exact arithmetic (attention key biases). A position, mask or
        # image-sharing error moves gradients by their own size.
        err, size = (grad - plain_grads[name]).norm(), plain_grads[name].norm()
        assert err <= 1e-4 * size + 1e-6, f"{name}: gradient error {err:.2e} of a gradient of size {size:.2e}"


def test_unsupported_or_mistyped_folders_are_refused_in_one_line_before_any_weight_loads(tmp_path):
    # A LLaVA-NeXT folder must not load as LLaVA-1.5 (it would with a layer dropped): its config alone decides.
    (tmp_path / "next").mkdir()
    (tmp_path / "next" / "config.json").write_text(json.dumps({"model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"]}))
    with pytest.raises(UnsupportedModelError) as e:
        load_vlm(VLMSpec(path=str(tmp_path / "next")))
    message = str(e.value)
    assert "\n" not in message and "'llava_next'" in message and "llava-1.5" in message and "qwen2.5-vl" in message
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        load_vlm(VLMSpec(path=str(tmp_path / "weights-only")))


def test_qwen25vl_generation_is_the_plain_processor_and_generate_per_row(tmp_path):
    """misp's batched, left-padded generation (images of different sizes in one batch) answers as the
    processor's own call and ``model.generate`` do for each row alone."""
    from misp.models.generation import generate

    model, processor = load_vlm(VLMSpec(path=str(_hub_folder("qwen2.5-vl", tmp_path))))
    images = _images()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    answers = generate(model, processor, images, prompts, max_new_tokens=5, batch_size=3)
    assert any(a[0] for a in answers)  # random weights still answer something
    for image, prompt, (answer,) in zip(images, prompts, answers, strict=True):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert answer == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_prompts_templated_for_another_family_are_retemplated_for_the_model_trained():
    """mDPO's prompts carry LLaVA-1.5's ``USER: <image>\\n... ASSISTANT:``: Qwen2.5-VL trains on its own
    chat template, and a ChatML prompt given to LLaVA gets LLaVA's; the same-family prompt is kept."""
    from misp.models.prompting import format_prompt
    from misp.testing.llava15 import build_llava15_processor
    from misp.testing.qwen25vl import build_qwen25vl_processor

    qwen, llava = build_qwen25vl_processor(), build_llava15_processor()
    question = "Is there a red circle in the image?"
    llava_templated = f"USER: <image>\n{question} ASSISTANT:"
    qwen_templated = format_prompt(question, qwen)
    assert qwen_templated.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert format_prompt(llava_templated, qwen) == qwen_templated
    assert encode_example(qwen, llava_templated, "Yes.") == encode_example(qwen, question, "Yes.")
    assert format_prompt(qwen_templated, llava) == llava_templated == format_prompt(question, llava)
    assert format_prompt(llava_templated, llava) == llava_templated  # kept verbatim, as before
    assert format_prompt(qwen_templated, qwen) == qwen_templated


def test_a_conversation_is_templated_by_the_family_and_scores_only_its_last_answer():
    """A multi-turn record on Qwen2.5-VL goes through its own chat template (ChatML, the image in the first
    user turn); the template's special tokens are not mistaken for special-token strings in the data, and
    only the final answer carries labels."""
    from misp.models.prompting import format_prompt
    from misp.testing.qwen25vl import build_qwen25vl_processor

    qwen = build_qwen25vl_processor()
    history = (("user", "Describe the image."), ("assistant", "A red circle."))
    text = format_prompt("Is there a blue square?", qwen, history)
    assert text.count("<|im_start|>user") == 2 and text.count("<|image_pad|>") == 1
    assert text.index("<|image_pad|>") < text.index("Describe the image.") < text.index("A red circle.")
    assert text.endswith("<|im_start|>assistant\n")
    enc = encode_example(qwen, "Is there a blue square?", "No.", history=history)
    single = encode_example(qwen, "Is there a blue square?", "No.")
    scored = [t for t, label in zip(enc["input_ids"], enc["labels"], strict=True) if label != -100]
    assert scored == [t for t, label in zip(single["input_ids"], single["labels"], strict=True) if label != -100]
    with pytest.raises(ValueError, match="earlier assistant turn contains the special token"):
        encode_example(qwen, "Is there a blue square?", "No.", history=(("user", "Hi"), ("assistant", "ok<|im_end|>")))


def test_qwen25vl_evaluation_scores_are_the_plain_forward_per_row(tmp_path):
    """The evaluation's per-image response log-probs (the grounding scores) on Qwen2.5-VL, images of three
    sizes in one forward, are each row's plain transformers log-prob: one templating path for training
    and evaluation."""
    from misp.eval.scoring import response_logps_per_image

    model, processor = load_vlm(VLMSpec(path=str(_hub_folder("qwen2.5-vl", tmp_path))))
    images = _images()
    items = [(PROMPTS[0], ROWS[0][1], images), (PROMPTS[1], ROWS[4][1], images[1:])]
    scores = response_logps_per_image(model, processor, items)
    with torch.no_grad():
        for (prompt, response, imgs), got in zip(items, scores, strict=True):
            want = torch.stack([_plain_row_logp(model, processor, prompt, response, im) for im in imgs])
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
