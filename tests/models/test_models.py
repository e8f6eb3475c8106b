"""misp.models VLM side: word tokenizer, tiny LLaVA, prompting, shared-image forward, LoRA, 4-bit,
save/load and generation. Everything runs offline on CPU with the tiny model."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from misp.models import (
    IGNORE_INDEX,
    LoraSpec,
    TinyLlavaConfig,
    VLMSpec,
    build_word_tokenizer,
    collate_examples,
    encode_example,
    format_prompt,
    generate,
    load_vlm,
    num_image_tokens,
    preprocess_images,
    save_vlm,
    vlm_logits,
)
from misp.models.quantized import keep_4bit_trainable
from misp.world.generate import WORLD_VERSION

WORDS = [
    "a", "an", "small", "large", "red", "blue", "green", "circle", "square", "triangle", "at", "the",
    "top", "bottom", "left", "right", "center", ".", "describe", "image", "is", "there", "in", "?", "yes", "no",
]
# Widths are multiples of 64, the block size of bitsandbytes' 4-bit quantisation.
TINY = TinyLlavaConfig(image_size=32, patch_size=8, vision_hidden_size=64, text_hidden_size=64, text_intermediate_size=128)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("world")
    (d / "world.json").write_text(json.dumps({"version": WORLD_VERSION, "vocabulary": WORDS}))
    return str(d)


@pytest.fixture(scope="module")
def tiny(world):
    model, processor = load_vlm(VLMSpec(tiny=TINY, vocabulary=world))
    return model, processor


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(processor, prompts, responses, images, padding_side="right"):
    ex = [encode_example(processor, p, r) for p, r in zip(prompts, responses, strict=True)]
    batch = collate_examples(ex, processor.tokenizer.pad_token_id, padding_side=padding_side)
    batch["pixel_values"] = preprocess_images(processor, images)
    return batch


# tokenizer ---------------------------------------------------------------------------------------------
def test_word_tokenizer_round_trip_and_unknown_words(tmp_path):
    tok = build_word_tokenizer(WORDS)
    text = "USER: <image>\nIs there a RED circle? ASSISTANT: yes. a zebra."
    ids = tok(text)["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ["<s>", "user", ":", "<image>", "is", "there", "a", "red", "circle", "?", "assistant", ":",
                    "yes", ".", "a", "<unk>", "."]
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids("<image>") == 4
    assert tok.decode(tok("a small red circle at the top left.", add_special_tokens=False)["input_ids"]) == (
        "a small red circle at the top left."
    )
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.get_vocab() == tok.get_vocab()


def test_word_tokenizer_rejects_multi_token_entries():
    with pytest.raises(ValueError, match="not a single word"):
        build_word_tokenizer(["top-left"])
    with pytest.raises(ValueError, match="special token"):
        build_word_tokenizer(["<pad>"])


# prompting ---------------------------------------------------------------------------------------------
def test_encode_example_matches_processor_and_masks_prompt(tiny):
    _, processor = tiny
    prompt, response = "is there a red circle in the image?", "yes. a red circle."
    img = _images(1)[0]
    ref = processor(images=[img], text=[format_prompt(prompt)], return_tensors="pt")["input_ids"][0].tolist()
    enc = encode_example(processor, prompt, response)
    n_img = num_image_tokens(processor)
    assert n_img == (TINY.image_size // TINY.patch_size) ** 2
    assert enc["input_ids"][: len(ref)] == ref
    assert ref.count(processor.image_token_id) == n_img
    supervised = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX]
    resp_ids = processor.tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    assert supervised == resp_ids + [processor.tokenizer.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX] * len(ref) + supervised
    assert processor.tokenizer.decode(supervised, skip_special_tokens=True) == response
    prompt_only = encode_example(processor, prompt)
    assert prompt_only["input_ids"] == ref and set(prompt_only["labels"]) == {IGNORE_INDEX}


def test_encode_example_truncates_response_never_the_image(tiny):
    _, processor = tiny
    prompt, response = "describe the image.", "a small red circle at the top left. a large blue square."
    full = encode_example(processor, prompt, response)
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = encode_example(processor, prompt, response, max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert cut["labels"][n_prompt:] == full["input_ids"][n_prompt : n_prompt + 3]
    with pytest.raises(ValueError, match="prompt alone"):
        encode_example(processor, prompt, response, max_length=n_prompt)
    with pytest.raises(ValueError, match="prompt alone"):
        encode_example(processor, prompt, None, max_length=n_prompt - 1)


def test_collate_pads_both_sides():
    ex = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate_examples(ex, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate_examples(ex, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


# save / load -------------------------------------------------------------------------------------------
def test_tiny_save_load_gives_identical_logits(tiny, tmp_path):
    model, processor = tiny
    batch = _batch(processor, ["describe the image."], ["a red circle."], _images(1))
    out = save_vlm(model, processor, tmp_path / "vlm")
    again, proc2 = load_vlm(VLMSpec(path=str(out)))
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        b = again(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    sa, sb = model.state_dict(), again.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # weights: bitwise
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # logits of another model object: float32
    assert encode_example(proc2, "describe the image.", "a red circle.") == encode_example(
        processor, "describe the image.", "a red circle."
    )


def test_tiny_build_is_seeded(world):
    a, _ = load_vlm(VLMSpec(tiny=TINY, vocabulary=world))
    b, _ = load_vlm(VLMSpec(tiny=TINY, vocabulary=world))
    c, _ = load_vlm(VLMSpec(tiny=TinyLlavaConfig(**{**TINY.__dict__, "seed": 1}), vocabulary=world))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_missing_path_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model") as e:
        load_vlm(VLMSpec(path=missing))
    assert "HF_HUB_OFFLINE" in str(e.value)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        with pytest.raises(FileNotFoundError, match="misp-test/not-downloaded"):
            load_vlm(VLMSpec(path="misp-test/not-downloaded"))


def test_spec_validation(world):
    with pytest.raises(ValueError, match="exactly one"):
        VLMSpec()
    with pytest.raises(ValueError, match="exactly one"):
        VLMSpec(path="x", tiny=TINY, vocabulary=world)
    with pytest.raises(ValueError, match="vocabulary"):
        VLMSpec(tiny=TINY)
    with pytest.raises(ValueError, match="dtype"):
        VLMSpec(tiny=TINY, vocabulary=world, dtype="float64")


# forward -----------------------------------------------------------------------------------------------
def test_vlm_logits_encodes_each_image_once_and_matches_plain_forward(tiny):
    model, processor = tiny
    prompts = ["describe the image.", "is there a red circle in the image?", "describe the image.", "is there a blue square in the image?"]
    responses = ["a small red circle at the top.", "no.", "a large blue square.", "yes."]
    images = _images(2)
    image_index = torch.tensor([0, 0, 1, 0])
    batch = _batch(processor, prompts, responses, images)
    calls: list[int] = []
    vt = model.model.vision_tower
    handle = vt.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            got = vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], image_index)
        assert calls == [2]  # one vision pass over the two distinct images
        with torch.no_grad():
            ref = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"][image_index],
            ).logits
    finally:
        handle.remove()
    mask = batch["attention_mask"].bool()
    assert got.shape == ref.shape == (4, batch["input_ids"].shape[1], len(processor.tokenizer))
    torch.testing.assert_close(got[mask], ref[mask], rtol=1e-5, atol=1e-5)
    # The rows really see different images: image 1's row differs from the same text on image 0.
    swapped = vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], torch.tensor([0, 0, 0, 0]))
    assert not torch.allclose(swapped[2][mask[2]], got[2][mask[2]], atol=1e-4)


def test_vlm_logits_gradients_match_repeated_images(world):
    """Sharing one encoding between rows must give the gradients of encoding the image once per row."""
    model, processor = load_vlm(VLMSpec(tiny=TINY, vocabulary=world))
    model.train()
    batch = _batch(processor, ["describe the image."] * 3, ["a red circle.", "a blue square.", "no."], _images(2))
    image_index = torch.tensor([1, 1, 0])
    labels = batch["labels"]

    def grads(logits):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        # The last vision layer gets no gradient (LLaVA reads the second-to-last): count it as zero.
        return {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters()
            if "vision_tower" in n or "projector" in n
        }

    shared = grads(vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], image_index))
    repeated = grads(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"][image_index]).logits)
    assert shared.keys() == repeated.keys() and any(g.abs().sum() > 0 for g in shared.values())
    for n in shared:
        torch.testing.assert_close(shared[n], repeated[n], rtol=1e-4, atol=1e-6, msg=n)


def test_gradient_checkpointing_keeps_lora_gradients(world):
    batch = None
    result = []
    for checkpointing in (False, True):
        spec = VLMSpec(tiny=TINY, vocabulary=world, lora=LoraSpec(r=4, alpha=8, dropout=0.0), gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # peft draws the LoRA A init from the global generator
        model, processor = load_vlm(spec)
        _randomise_lora_b(model)
        model.train()
        if batch is None:
            batch = _batch(processor, ["describe the image."] * 2, ["a red circle.", "no."], _images(1))
        logits = vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], torch.tensor([0, 0]))
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX).backward()
        result.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    assert result[0].keys() == result[1].keys()
    for n in result[0]:
        torch.testing.assert_close(result[0][n], result[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_vlm_logits_is_padding_side_invariant(tiny):
    model, processor = tiny
    prompts, responses = ["describe the image.", "is there a red circle in the image?"], ["a small red circle.", "no."]
    images = _images(2, seed=3)
    right = _batch(processor, prompts, responses, images, "right")
    left = _batch(processor, prompts, responses, images, "left")
    with torch.no_grad():
        r = vlm_logits(model, right["input_ids"], right["attention_mask"], right["pixel_values"])
        lo = vlm_logits(model, left["input_ids"], left["attention_mask"], left["pixel_values"])
    torch.testing.assert_close(r[right["attention_mask"].bool()], lo[left["attention_mask"].bool()], rtol=1e-4, atol=1e-4)


def test_vlm_logits_rejects_bad_image_index(tiny):
    model, processor = tiny
    batch = _batch(processor, ["describe the image."] * 2, ["a red circle."] * 2, _images(1))
    with pytest.raises(ValueError, match="image_index"):
        vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], torch.tensor([0, 1]))


# LoRA --------------------------------------------------------------------------------------------------
def _randomise_lora_b(model) -> None:
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_lora_targets_language_model_only_and_disable_adapter_is_the_base(tiny, world, tmp_path):
    base, processor = tiny
    peft_model, _ = load_vlm(VLMSpec(tiny=TINY, vocabulary=world, lora=LoraSpec(r=4, alpha=8, dropout=0.0)))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    _randomise_lora_b(peft_model)
    batch = _batch(processor, ["describe the image.", "is there a red circle in the image?"], ["a red circle.", "no."], _images(2))
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], torch.tensor([1, 1]))
    with torch.no_grad():
        adapted = vlm_logits(peft_model, *args)
        with peft_model.disable_adapter():
            disabled = vlm_logits(peft_model, *args)
        reference = vlm_logits(base, *args)
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(disabled[mask], reference[mask], rtol=1e-5, atol=1e-5)
    assert (adapted - reference)[mask].abs().max() > 1e-2

    # Merged export equals the adapted model; an unmerged export re-attaches the adapter.
    merged, _ = load_vlm(VLMSpec(path=str(save_vlm(peft_model, processor, tmp_path / "merged"))))
    unmerged_dir = save_vlm(peft_model, processor, tmp_path / "unmerged", merge_lora=False)
    assert (unmerged_dir / "adapter" / "adapter_config.json").is_file()
    unmerged, _ = load_vlm(VLMSpec(path=str(unmerged_dir)))
    assert hasattr(merged, "config") and not hasattr(merged, "peft_config")
    assert hasattr(unmerged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(vlm_logits(merged, *args)[mask], adapted[mask], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vlm_logits(unmerged, *args)[mask], adapted[mask], rtol=1e-5, atol=1e-5)
    # Saving did not merge the live model: the adapter can still be switched off.
    with torch.no_grad(), peft_model.disable_adapter():
        torch.testing.assert_close(vlm_logits(peft_model, *args)[mask], reference[mask], rtol=1e-5, atol=1e-5)


# 4-bit -------------------------------------------------------------------------------------------------
def test_4bit_forward_on_cpu(tiny, world):
    import bitsandbytes as bnb

    base, processor = tiny
    q, _ = load_vlm(VLMSpec(tiny=TINY, vocabulary=world, load_in_4bit=True))
    layers = dict(q.named_modules())
    lm_linears = [n for n, m in layers.items() if "language_model" in n and n.endswith(("q_proj", "down_proj"))]
    assert lm_linears and all(isinstance(layers[n], bnb.nn.Linear4bit) for n in lm_linears)
    assert layers["model.language_model.layers.0.self_attn.q_proj"].weight.quant_state.quant_type == "nf4"
    batch = _batch(processor, ["describe the image."], ["a red circle at the top."], _images(1))
    with torch.no_grad():
        lq = vlm_logits(q, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        lf = vlm_logits(base, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    assert torch.isfinite(lq).all()
    # Close-ish: 4-bit weights perturb the logits but keep their shape.
    rel = (lq - lf).norm() / lf.norm()
    corr = torch.corrcoef(torch.stack([lq.flatten(), lf.flatten()]))[0, 1]
    assert rel < 0.35 and corr > 0.95, (rel, corr)


def test_4bit_lora_step_changes_only_lora(world, tmp_path):
    spec = VLMSpec(tiny=TINY, vocabulary=world, load_in_4bit=True, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    model, processor = load_vlm(spec)
    model.train()
    batch = _batch(processor, ["describe the image."], ["a red circle at the top."], _images(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(
        "lora_" in n for n, p in model.named_parameters() if p.requires_grad
    )
    opt = torch.optim.SGD(params, lr=0.5)
    logits = vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=IGNORE_INDEX)
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_B" in k for k in changed)

    # A 4-bit base cannot be merged: the export keeps base and adapter apart, and loads back.
    with pytest.warns(UserWarning, match="unquantised base"):
        out = save_vlm(model, processor, tmp_path / "q", merge_lora=True)
    again, _ = load_vlm(VLMSpec(path=str(out)))
    # Loaded for inference, `again` would run bitsandbytes' CPU inference kernel (about 1e-3 off the kernel
    # training uses, which `model` keeps for its gradients): compare the weights through one kernel.
    keep_4bit_trainable(again)
    model.eval()
    with torch.no_grad():
        a = vlm_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        b = vlm_logits(again, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# generation --------------------------------------------------------------------------------------------
def test_greedy_generation_is_deterministic_and_batch_invariant(tiny):
    model, processor = tiny
    images = _images(3, seed=5)
    prompts = ["describe the image.", "is there a red circle in the image?", "is there a large blue square in the image?"]
    a = generate(model, processor, images, prompts, max_new_tokens=6, batch_size=3)
    b = generate(model, processor, images, prompts, max_new_tokens=6, batch_size=3)
    c = generate(model, processor, images, prompts, max_new_tokens=6, batch_size=1)
    assert a == b == c
    assert len(a) == 3 and all(len(x) == 1 and isinstance(x[0], str) for x in a)
    # The answer is exactly the decoded continuation of the unpadded prompt, without the prompt.
    enc = encode_example(processor, prompts[1])
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([enc["input_ids"]]),
            pixel_values=preprocess_images(processor, [images[1]]),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    new_tokens = out[0, len(enc["input_ids"]) :]
    assert a[1][0] == processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def test_seeded_sampling_is_reproducible(tiny):
    model, processor = tiny
    images, prompts = _images(2, seed=7), ["describe the image.", "is there a red circle in the image?"]
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, num_return_sequences=3, seed=11)
    torch.manual_seed(0)
    a = generate(model, processor, images, prompts, **kw)
    state = torch.random.get_rng_state()
    b = generate(model, processor, images, prompts, **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    assert a == b and len(a) == 2 and all(len(x) == 3 for x in a)
    assert len({s for x in a for s in x}) > 1  # sampling at temperature 1.5 gives varied answers


def test_4bit_loads_onto_this_ranks_gpu(monkeypatch, tmp_path):
    """Under FSDP/DDP each process quantises onto its own GPU (LOCAL_RANK), not all onto cuda:0."""
    from transformers import AutoModelForImageTextToText

    from misp.models import vlm as vlm_module

    seen = {}

    def fake_from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("stop after the arguments")

    (tmp_path / "config.json").write_text('{"model_type": "llava"}')  # the family is read before loading
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(OSError):
        vlm_module._from_pretrained(str(tmp_path), VLMSpec(path=str(tmp_path), load_in_4bit=True))
    assert seen["device_map"] == {"": torch.device("cuda", 3)}
    seen.clear()
    with pytest.raises(OSError):
        vlm_module._from_pretrained(str(tmp_path), VLMSpec(path=str(tmp_path), load_in_4bit=True, device_map="auto"))
    assert seen["device_map"] == "auto"  # an explicit choice is kept
