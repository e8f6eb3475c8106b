"""LoRA gradients through a 4-bit base are the gradients of the dequantised model, also after an eval pass.

bitsandbytes repacks a 4-bit weight into a CPU inference layout on its first eval-mode, no-grad forward
(on CPUs with AVX512-BF16), and the backward through that layer is then silently dropped. The reference
here is the same model in float32 with every 4-bit layer replaced by an ``nn.Linear`` holding its
dequantised weight: the exact function the 4-bit model computes, so its LoRA gradients are the truth.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from misp.logprobs import sequence_logps
from misp.models import (
    LoraSpec,
    TinyLlavaConfig,
    VLMSpec,
    collate_examples,
    encode_example,
    load_vlm,
    preprocess_images,
)
from misp.models.quantized import keep_4bit_trainable
from misp.world.generate import WORLD_VERSION

bnb = pytest.importorskip("bitsandbytes")

WORDS = ["a", "red", "blue", "circle", "square", "at", "the", "top", "left", ".", "describe", "image", "is",
         "there", "in", "?", "yes", "no"]
# Widths are multiples of 64, as bitsandbytes' CPU 4-bit kernels need.
TINY = TinyLlavaConfig(image_size=32, patch_size=8, vision_hidden_size=64, vision_heads=2, text_hidden_size=64,
                       text_heads=2, text_intermediate_size=128)
# float32: the 4-bit matmul dequantises and runs the same float32 kernel as the reference, so only summation
# order may differ (float32 unit roundoff 6e-8); 1e-4 leaves room for that and nothing else.
# bfloat16 (configs/llava.yaml's dtypes): every activation is rounded to 8 significant bits (unit roundoff
# 2^-8 = 0.004) through two vision and two language layers; measured 0.015 overall and 0.024 for the worst
# LoRA A tensor. A dropped backward gives 0.65 / 1.4 (float32) and 0.88 / 1.1 (bfloat16).
TOLERANCE = {"float32": (1e-4, 1e-4), "bfloat16": (0.08, 0.15)}
"""dtype -> (relative L2 error of all LoRA gradients together, of the worst single LoRA A gradient)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("world")
    (d / "world.json").write_text(json.dumps({"version": WORLD_VERSION, "vocabulary": WORDS}))
    return str(d)


def _load(world: str, dtype: str):
    kwargs = dict(dtype=dtype, bnb_4bit_quant_storage=dtype) if dtype == "bfloat16" else {}
    model, processor = load_vlm(VLMSpec(tiny=TINY, vocabulary=world, load_in_4bit=True,
                                        lora=LoraSpec(r=4, alpha=8, dropout=0.0), **kwargs))
    # LoRA B starts at zero, which makes every LoRA A gradient zero: give B values, so A's gradients carry
    # the signal that flows back through the frozen 4-bit layers above.
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    examples = [encode_example(processor, "describe the image.", "a red circle at the top left."),
                encode_example(processor, "is there a blue square in the image?", "no.")]
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in examples]
    batch["pixel_values"] = preprocess_images(processor, images)
    return model, batch


def _dequantised_reference(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` whose 4-bit layers are ``nn.Linear`` with the dequantised weights."""
    from bitsandbytes.functional import dequantize_4bit

    ref = copy.deepcopy(model)
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                assert not getattr(child.weight.quant_state, "packing_format_for_cpu", False)
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                linear.weight.data.copy_(dequantize_4bit(child.weight.data, child.weight.quant_state).float())
                if child.bias is not None:
                    linear.bias.data.copy_(child.bias.data.float())
                setattr(parent, name, linear.requires_grad_(False))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in ref.modules())
    return ref.float()


def _lora_grads(model: nn.Module, batch: dict, pixel_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Gradients of the summed response log-probability (the quantity every preference loss is built on)."""
    model.train()
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"].to(pixel_dtype)).logits
    sequence_logps(logits, batch["labels"]).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    return grads


def _eval_pass(model: nn.Module, batch: dict, pixel_dtype: torch.dtype) -> None:
    # What validation and a no-grad reference pass do, and what triggers bitsandbytes' CPU repack.
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"].to(pixel_dtype))


def _errors(got: dict, want: dict) -> tuple[float, float]:
    total = torch.sqrt(sum(((got[k] - want[k]) ** 2).sum() for k in want)) / torch.sqrt(sum((want[k] ** 2).sum() for k in want))
    worst = max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want if "lora_A" in k)
    return float(total), worst


def _packed(model: nn.Module) -> int:
    return sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False))
               for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_gradients_through_4bit_layers_survive_an_eval_pass(world, dtype):
    model, batch = _load(world, dtype)
    pixel_dtype = getattr(torch, dtype)
    want = _lora_grads(_dequantised_reference(model), batch, torch.float32)
    assert all(want[k].abs().sum() > 0 for k in want if "lora_A" in k)  # B != 0: A's gradients are not trivial

    _eval_pass(model, batch, pixel_dtype)
    total, worst = _errors(_lora_grads(model, batch, pixel_dtype), want)
    max_total, max_worst = TOLERANCE[dtype]
    assert total <= max_total and worst <= max_worst, f"relative error {total:.4g} (worst LoRA A {worst:.4g})"
    assert _packed(model) == 0


def test_keep_4bit_trainable_undoes_a_repack_already_done(world):
    model, batch = _load(world, "float32")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True  # as loaded without the guard
    _eval_pass(model, batch, torch.float32)
    n = _packed(model)
    if n == 0:
        pytest.skip("this bitsandbytes or CPU does not repack 4-bit weights (it does on CPUs with AVX512-BF16)")
    assert keep_4bit_trainable(model) == n and _packed(model) == 0
    # The restored weights: dequantised now, they are what the model computes with from here on.
    want = _lora_grads(_dequantised_reference(model), batch, torch.float32)
    _eval_pass(model, batch, torch.float32)
    total, worst = _errors(_lora_grads(model, batch, torch.float32), want)
    assert total <= 1e-4 and worst <= 1e-4, (total, worst)
