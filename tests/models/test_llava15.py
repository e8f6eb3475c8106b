"""The LLaVA-1.5 stand-in: real architecture and hub layout, resolved from an offline hub cache by its hub
id, loaded 4-bit with LoRA as configs/llava.yaml does, prompted with 576 image tokens; and the CLIP
stand-in loaded through load_clip's pretrained path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from misp.models.hub_cache import hub_cache_env, repo_folder_name, use_hub_cache
from misp.models.llava15 import (
    CHAT_TEMPLATE,
    HUB_REPO_ID,
    Llava15Sizes,
    build_llama_tokenizer,
    build_llava15,
)
from misp.models.prompting import (
    IGNORE_INDEX,
    collate_examples,
    encode_example,
    format_prompt,
    num_image_tokens,
    preprocess_images,
)
from misp.smoke import SMOKE_CLIP_HUB, smoke_clip_hub, smoke_llava15_hub

ROOT = Path(__file__).resolve().parents[2]
# configs/llava.yaml's VLM, as the CLI would build it.
LLAVA_YAML_VLM = dict(path=HUB_REPO_ID, load_in_4bit=True, dtype="bfloat16", bnb_4bit_compute_dtype="bfloat16",
                      bnb_4bit_quant_storage="bfloat16")


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    smoke_llava15_hub(cache)
    smoke_clip_hub(cache)
    return cache


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8))


def test_architecture_and_processor_are_llava15():
    model, processor = build_llava15()
    cfg, tok = model.config, processor.tokenizer
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.projector_hidden_act) == (-2, "default", "gelu")
    assert cfg.image_seq_length == 576 and not cfg.tie_word_embeddings
    assert cfg.vision_config.hidden_act == "quick_gelu" and (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    assert cfg.text_config.hidden_act == "silu" and cfg.text_config.rms_norm_eps == 1e-5
    # Llama's special ids; <image> and <pad> right after the base vocabulary; rows padded to 64.
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    base = tok.convert_tokens_to_ids("<image>")
    assert cfg.image_token_index == base and tok.pad_token_id == base + 1 and len(tok) == base + 2
    assert cfg.text_config.vocab_size % 64 == 0 and cfg.text_config.vocab_size - 64 < base + 2 <= cfg.text_config.vocab_size
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ip = processor.image_processor
    assert ip.crop_size == {"height": 336, "width": 336} and ip.size == {"shortest_edge": 336}
    assert ip.do_center_crop and ip.do_normalize and ip.resample == 3 and ip.rescale_factor == pytest.approx(1 / 255)
    assert list(ip.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert (processor.patch_size, processor.num_additional_image_tokens, processor.vision_feature_select_strategy) == (14, 1, "default")
    # The hub's chat template renders misp's own prompt template.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == "USER: <image>\nWhat is shown here? ASSISTANT:" == format_prompt("What is shown here?")
    assert processor.chat_template == CHAT_TEMPLATE


def test_tokenizer_is_llama_bpe_with_byte_fallback():
    tok = build_llama_tokenizer()
    ids = tok("USER: <image>\nIs there a red circle? ASSISTANT: Yes")["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<s>" and "<image>" in toks and "▁there" in toks and "<0x0A>" in toks  # "\n" as a byte
    unseen = "Zebra über 日本"
    ids = tok(unseen, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == unseen
    assert build_llama_tokenizer().get_vocab() == tok.get_vocab()  # trained deterministically


def test_build_is_seeded_and_takes_dtype():
    a, _ = build_llava15(seed=0)
    b, _ = build_llava15(seed=0)
    c, _ = build_llava15(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    bf, _ = build_llava15(Llava15Sizes(text_layers=1), dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    real = Llava15Sizes.real_width(text_layers=2)
    assert (real.text_hidden_size, real.text_heads, real.text_intermediate_size, real.vocab_size) == (4096, 32, 11008, 32064)
    assert (real.vision_hidden_size, real.vision_heads, real.num_image_tokens) == (1024, 16, 576)


def test_hub_cache_layout_and_round_trip(hub_cache):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    repo = hub_cache / repo_folder_name(HUB_REPO_ID)
    commit = (repo / "refs/main").read_text()
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)
    snap = repo / "snapshots" / commit
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((snap / s).is_file() for s in shards)
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "chat_template.json", "tokenizer.json", "tokenizer_config.json", *shards):
        link = snap / name
        assert link.is_symlink() and link.resolve().parent == (repo / "blobs").resolve(), name
    assert json.loads((snap / "processor_config.json").read_text())["patch_size"] == 14

    model, processor = build_llava15()  # the same seed: the same weights as the cached ones
    with use_hub_cache(hub_cache):
        loaded = LlavaForConditionalGeneration.from_pretrained(HUB_REPO_ID)
        proc = AutoProcessor.from_pretrained(HUB_REPO_ID)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    text = "USER: <image>\nIs there a dog? ASSISTANT: No, there is not."
    assert proc.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert proc.image_token_id == loaded.config.image_token_index and proc.chat_template == CHAT_TEMPLATE
    pv = proc(images=[_image()], text=[format_prompt("Is there a dog?")], return_tensors="pt")
    assert pv["pixel_values"].shape == (1, 3, 336, 336)
    assert int((pv["input_ids"] == loaded.config.image_token_index).sum()) == 576


def test_hub_id_resolves_from_env_in_a_fresh_process(hub_cache):
    code = (
        "import json, transformers\n"
        "from transformers import AutoProcessor, LlavaForConditionalGeneration\n"
        f"m = LlavaForConditionalGeneration.from_pretrained({HUB_REPO_ID!r})\n"
        f"p = AutoProcessor.from_pretrained({HUB_REPO_ID!r})\n"
        "print(json.dumps({'n': sum(x.numel() for x in m.parameters()), 'image': p.image_token_id,"
        " 'sum': float(sum(x.double().sum() for x in m.parameters()))}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | hub_cache_env(hub_cache)
    env["HF_HOME"] = str(hub_cache / "no-such-home")  # nothing but HF_HUB_CACHE can supply the files
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    model, processor = build_llava15()
    assert got["n"] == sum(x.numel() for x in model.parameters())
    assert got["image"] == processor.image_token_id
    assert got["sum"] == pytest.approx(float(sum(x.detach().double().sum() for x in model.parameters())), rel=1e-12)


def test_load_vlm_4bit_lora_and_576_image_tokens(hub_cache):
    import bitsandbytes as bnb

    from misp.models.vlm import LoraSpec, VLMSpec, load_vlm

    with use_hub_cache(hub_cache):
        model, processor = load_vlm(VLMSpec(**LLAVA_YAML_VLM, lora=LoraSpec(r=8, alpha=16, dropout=0.0)))
    layers = dict(model.named_modules())
    q = [m for m in layers.values() if isinstance(m, bnb.nn.Linear4bit)]
    assert q and all(m.weight.quant_state.quant_type == "nf4" and m.weight.dtype == torch.bfloat16 for m in q)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)

    assert num_image_tokens(processor) == 576
    prompt, response = "Is there a red circle in the image?", "Yes, there is a red circle."
    enc = encode_example(processor, prompt, response)
    ref = processor(images=[_image()], text=[format_prompt(prompt)], return_tensors="pt")["input_ids"][0].tolist()
    assert enc["input_ids"][: len(ref)] == ref and ref.count(processor.image_token_id) == 576
    supervised = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX]
    assert enc["labels"][: len(ref)] == [IGNORE_INDEX] * len(ref) and supervised == enc["input_ids"][len(ref):]
    assert supervised[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.decode(supervised, skip_special_tokens=True) == response

    batch = collate_examples([enc], processor.tokenizer.pad_token_id)
    pixels = preprocess_images(processor, [_image()]).to(torch.bfloat16)
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                labels=batch["labels"])
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_clip_stand_in_loads_through_the_pretrained_path(hub_cache):
    from misp.models.clip import ClipSpec, TinyClipConfig, build_tiny_clip, load_clip
    from misp.negatives.projection import make_joint_embedding

    name = "hf-hub:misp-test/tiny-clip"
    with use_hub_cache(hub_cache):
        bundle = load_clip(ClipSpec(model_name=name, pretrained="openai"))
    expected = build_tiny_clip(TinyClipConfig(**SMOKE_CLIP_HUB)).model.state_dict()
    got = bundle.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert bundle.identity == f"{name}/openai" and bundle.model_cfg["embed_dim"] == 128
    with torch.no_grad():
        img = bundle.model.encode_image(bundle.preprocess(_image()).unsqueeze(0))
        txt = bundle.model.encode_text(bundle.tokenizer(["a red circle"]))
    assert img.shape == txt.shape == (1, 128)
    assert make_joint_embedding(128, 128, proj_dim=4096).projected  # configs/llava.yaml's proj_dim projects
