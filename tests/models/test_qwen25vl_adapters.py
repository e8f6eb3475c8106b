"""Qwen2.5-VL (and the export of Qwen3-VL and Gemma 3) loading as misp does it: 4-bit reaches the language model only (the vision tower and merger
stay in the compute dtype), LoRA reaches the language model's projections only (the vision MLP shares
their names), FSDP's units are the family's blocks, and an exported adapter loads with plain
transformers + peft to the same logits."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from misp.models.families import family_for_processor
from misp.models.forward import vlm_logits
from misp.models.prompting import collate_examples, encode_example, prepare_images
from misp.models.sharding import decoder_layers
from misp.models.vlm import LoraSpec, VLMSpec, load_vlm, save_vlm
from misp.testing.gemma3 import build_gemma3, save_gemma3_hub_files
from misp.testing.qwen3vl import build_qwen3vl, save_qwen3vl_hub_files


def _inputs(processor):
    batch = collate_examples([encode_example(processor, "What is in the image?", "A red circle.")] * 2,
                             processor.tokenizer.pad_token_id)
    images = prepare_images(processor, [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (96, 64), "blue")])
    return batch["input_ids"], batch["attention_mask"], images


def test_4bit_and_lora_reach_the_language_model_only(qwen_dir):
    bnb = pytest.importorskip("bitsandbytes")
    model, processor = load_vlm(VLMSpec(path=str(qwen_dir), load_in_4bit=True, lora=LoraSpec(r=4, alpha=8, dropout=0.0)))
    names = dict(model.named_modules())
    quantized = {n for n, m in names.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(".language_model." in n for n in quantized)
    assert not any("visual" in n for n in quantized)  # the vision tower and merger stay unquantised
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora and all(".language_model." in n for n in lora)
    assert len(lora) == 2 * 7  # q/k/v/o/gate/up/down of each of the 2 decoder layers
    ids, mask, images = _inputs(processor)
    vlm_logits(model, ids, mask, images).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_fsdp_units_are_the_decoder_layers_and_vision_blocks(qwen_dir):
    model, _ = load_vlm(VLMSpec(path=str(qwen_dir)))
    kinds = sorted({type(m).__name__ for m in decoder_layers(model)})
    assert kinds == ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]
    assert len(decoder_layers(model)) == 2 + 2


@pytest.mark.parametrize(("family", "merge"), [("qwen2.5-vl", False), ("qwen2.5-vl", True), ("qwen3-vl", False),
                                               ("gemma-3", False)])
def test_an_exported_adapter_loads_with_plain_transformers_and_peft(qwen_dir, tmp_path, family, merge):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if family == "qwen3-vl":
        qwen_dir = tmp_path / "qwen3vl"
        save_qwen3vl_hub_files(*build_qwen3vl(), qwen_dir)
    elif family == "gemma-3":
        qwen_dir = tmp_path / "gemma3"
        save_gemma3_hub_files(*build_gemma3(), qwen_dir)
    model, processor = load_vlm(VLMSpec(path=str(qwen_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():  # a trained adapter: B is zero at init
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    model.eval()
    ids, mask, images = _inputs(processor)
    with torch.no_grad():
        want = vlm_logits(model, ids, mask, images)
    out = save_vlm(model, processor, tmp_path / "export", merge_lora=merge)
    plain = AutoModelForImageTextToText.from_pretrained(out)
    if not merge:
        plain = PeftModel.from_pretrained(plain, out / "adapter")
    plain.eval()
    plain_processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    sep = family_for_processor(plain_processor).response_separator
    text = (plain_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + sep
            + "A red circle." + plain_processor.tokenizer.eos_token)
    inputs = plain_processor(text=[text], images=[[Image.new("RGB", (96, 64), "blue")]], return_tensors="pt")
    with torch.no_grad():
        got = plain(**inputs).logits[0]
    torch.testing.assert_close(got, want[1, : got.shape[0]], rtol=1e-4, atol=1e-4)
