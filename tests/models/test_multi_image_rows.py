"""Prompts with several images, for the families that take them (Qwen2.5-VL, Qwen3-VL, Gemma 3): each row's
response log-probs and gradients, computed by misp in one mixed batch (rows of two images and of one, images
of different sizes, images shared between rows and placed at different points of the prompt), equal a plain
transformers forward of that row alone with its images, as tests/test_family_rows.py checks for one image.
LLaVA-1.5 refuses such a prompt in one line that names the record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from misp.data.encoding import encode_records
from misp.data.records import PreferenceRecord, ReadResult, RecordError
from misp.logprobs import sequence_logps
from misp.models.families import family_for_processor
from misp.models.forward import images_per_row, response_logits
from misp.models.prompting import collate_examples, encode_example, prepare_images
from misp.models.vlm import VLMSpec, load_vlm
from misp.testing.gemma3 import build_gemma3, save_gemma3_hub_files
from misp.testing.llava15 import build_llava15_processor
from misp.testing.qwen3vl import build_qwen3vl, save_qwen3vl_hub_files
from misp.testing.qwen25vl import build_qwen25vl, save_qwen25vl_hub_files

TWO = "<image>\n<image>\nWhat differs between the two images?"
MIDDLE = "Compare <image> with <image>, in one sentence."
ONE = "What is in the image?"
# (prompt, response, the images in prompt order, the same turn as plain chat-template content)
ROWS = [
    (TWO, "The second one is larger.", (0, 1),
     [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What differs between the two images?"}]),
    (TWO, "They are the same.", (0, 1),
     [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What differs between the two images?"}]),
    (TWO, "The second one is larger.", (1, 2),
     [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What differs between the two images?"}]),
    (ONE, "A red circle.", (2,), [{"type": "image"}, {"type": "text", "text": ONE}]),
    (MIDDLE, "The first is darker than the second.", (2, 0),
     [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"},
      {"type": "text", "text": ", in one sentence."}]),
]
WEIGHTS = torch.tensor([1.0, -0.5, 0.7, 0.3, -1.2])


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    sizes = [(64, 64), (96, 64), (128, 96)]  # dynamic-resolution families: three different token counts
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in sizes]


def _hub_folder(family: str, tmp_path: Path) -> Path:
    build, save = {"qwen2.5-vl": (build_qwen25vl, save_qwen25vl_hub_files), "qwen3-vl": (build_qwen3vl, save_qwen3vl_hub_files),
                   "gemma-3": (build_gemma3, save_gemma3_hub_files)}[family]
    model, processor = build()
    save(model, processor, tmp_path)
    return tmp_path


def _plain_row_logp(model, processor, content: list[dict], response: str, images: list[Image.Image]) -> torch.Tensor:
    """The row's response log-prob from the processor's own call on its images and the model's own forward."""
    prompt_text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)
    full_text = prompt_text + family_for_processor(processor).response_separator + response + processor.tokenizer.eos_token
    n_prompt = processor(text=[prompt_text], images=[images], return_tensors="pt")["input_ids"].shape[1]
    inputs = processor(text=[full_text], images=[images], return_tensors="pt")
    logits = model(**inputs, use_cache=False).logits[0, :-1]
    targets = inputs["input_ids"][0, 1:]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None])[:, 0]
    return logps[n_prompt - 1 :].sum()


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl", "gemma-3"])
def test_rows_of_several_images_equal_their_plain_forward(family, tmp_path):
    model, processor = load_vlm(VLMSpec(path=str(_hub_folder(family, tmp_path))))
    model.eval()
    images = _images()

    examples = [encode_example(processor, prompt, response) for prompt, response, _, _ in ROWS]
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    image_id = int(model.config.image_token_id)
    assert images_per_row(batch["input_ids"], batch["attention_mask"], image_id) == [len(r[2]) for r in ROWS]
    prepared = prepare_images(processor, images)  # the three distinct images, each encoded once
    index = torch.tensor([i for _, _, ims, _ in ROWS for i in ims])  # one per image slot, in row order
    model.zero_grad(set_to_none=True)
    logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], prepared, batch["labels"], index)
    misp_logps = sequence_logps(logits, labels)
    (WEIGHTS * misp_logps).sum().backward()
    misp_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    plain = []
    for (_, response, ims, content), w in zip(ROWS, WEIGHTS, strict=True):
        logp = _plain_row_logp(model, processor, content, response, [images[i] for i in ims])
        (w * logp).backward()
        plain.append(logp.detach())
    plain_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(misp_logps.detach(), torch.stack(plain), rtol=1e-4, atol=1e-4)
    assert misp_grads.keys() == plain_grads.keys()
    assert any("visual" in n or "vision_tower" in n for n in misp_grads)
    for name, grad in misp_grads.items():
        err, size = (grad - plain_grads[name]).norm(), plain_grads[name].norm()
        assert err <= 1e-4 * size + 1e-6, f"{name}: gradient error {err:.2e} of a gradient of size {size:.2e}"

    # A wrong number of images for the rows' slots is refused, not silently misplaced.
    with pytest.raises(ValueError, match="one image per image slot"):
        response_logits(model, batch["input_ids"], batch["attention_mask"], prepared, batch["labels"], index[:-1])


def test_llava15_refuses_a_prompt_of_several_images_naming_the_record(tmp_path):
    processor = build_llava15_processor()
    with pytest.raises(ValueError, match=r"^the prompt contains '<image>' 2 times: 2 images, but a llava-1.5 model takes 1 per prompt .*qwen2.5-vl"):
        encode_example(processor, TWO, "x")
    records = [PreferenceRecord("ok", tmp_path / "a.png", ONE, "a", "b"), PreferenceRecord("two", tmp_path / "a.png", TWO, "a", "b")]
    read = ReadResult(records, [], tmp_path / "prefs.jsonl", lines=[1, 2])
    with pytest.raises(RecordError) as e:
        encode_records(read, ("chosen", "rejected"), lambda p, r: encode_example(processor, p, r))
    message = str(e.value)
    assert "\n" not in message and "prefs.jsonl:2" in message and "'prompt'" in message and "record 'two'" in message
    assert "2 images" in message


def test_generation_with_several_images_is_the_plain_processor_and_generate_per_row(tmp_path):
    from misp.models.generation import generate

    model, processor = load_vlm(VLMSpec(path=str(_hub_folder("qwen2.5-vl", tmp_path))))
    images = _images()
    rows = [ROWS[0], ROWS[3], ROWS[4]]  # two images, one, two placed mid-text: one left-padded batch
    answers = generate(model, processor, [[images[i] for i in ims] if len(ims) > 1 else images[ims[0]] for _, _, ims, _ in rows],
                       [prompt for prompt, _, _, _ in rows], max_new_tokens=5, batch_size=3)
    assert any(a[0] for a in answers)
    for (_, _, ims, content), (answer,) in zip(rows, answers, strict=True):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[[images[i] for i in ims]], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert answer == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="prompt 0 holds 2 image"):
        generate(model, processor, [images[0]], [TWO], max_new_tokens=2)
