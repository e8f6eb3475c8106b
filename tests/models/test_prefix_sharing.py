"""Prefix sharing (``response_logits(prefix_sharing=True)``): rows that share image and prompt run as one
packed row with a block mask, and every row's log-prob and every parameter's gradient equal the unshared
rows' to float rounding, per family (M-RoPE included), in float32 and bfloat16, with LoRA and gradient
checkpointing, through a 4-bit base, and under FSDP.

The batch is a preference step's: chosen and rejected (and a third response) on the positive image, the
chosen on two negatives of other sizes (their own prefix), and a second prompt on a negative with two
responses (a second shared group). Weights per row make every row's gradient count.
"""

from __future__ import annotations

import functools
import logging
import tempfile

import pytest
import torch
from PIL import Image

from misp.logprobs import sequence_logps
from misp.models import prefix_sharing
from misp.models.families import family_of
from misp.models.families.base import ModelFamily
from misp.models.forward import _image_token_id, expand_image_rows, response_logits
from misp.models.prefix_sharing import (
    block_mask,
    choose_layout,
    first_fit_decreasing,
    gather_packed,
    layout_cost,
    plan_packing,
)
from misp.models.prompting import collate_examples, encode_example, prepare_images
from misp.testing.gemma3 import build_gemma3
from misp.testing.llava15 import Llava15Sizes, build_llava15
from misp.testing.qwen3vl import build_qwen3vl
from misp.testing.qwen25vl import build_qwen25vl

SMALL_LLAVA = Llava15Sizes(image_size=112)  # 64 image tokens: the geometry's code path at smoke cost


def _llava(**kwargs):
    return build_llava15(SMALL_LLAVA, **kwargs)


BUILDERS = {"llava-1.5": _llava, "qwen2.5-vl": build_qwen25vl, "qwen3-vl": build_qwen3vl, "gemma-3": build_gemma3}
PROMPTS = ["What is in the image?", "Is there a red circle in the image?"]
# (prompt, response, image)
ROWS = [(0, "The image shows a red circle at the top left.", 0), (0, "There is a blue square.", 0),
        (0, "The image shows a red circle at the top left.", 1), (0, "The image shows a red circle at the top left.", 2),
        (1, "Yes, there is.", 1), (0, "No.", 0), (1, "A circle at the bottom.", 1)]
GROUPS = [[0, 1, 5], [2], [3], [4, 6]]  # the packed rows: rows sharing image and prompt
WEIGHTS = torch.tensor([1.0, -0.5, 0.7, 0.3, -1.2, 0.9, 0.4])
# (log-prob atol, gradient error relative to the gradient's norm). float32: summation order only (measured
# <= 4e-6 and 3e-7). bfloat16: the shared and unshared paths round differently (different matmul shapes) at
# 8 significant bits; measured <= 4.3e-4 nats and 5.2e-3 of the gradient over the four families. A position or
# mask error moves log-probs by nats and gradients by their own size.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (0.01, 0.02)}


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 64), (96, 64), (128, 96)]  # dynamic-resolution families: three token counts
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()) for w, h in sizes]


def _batch(processor, dtype: torch.dtype):
    examples = [encode_example(processor, PROMPTS[p], r) for p, r, _ in ROWS]
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    images = prepare_images(processor, _images()).to("cpu", dtype)
    return batch, images, torch.tensor([i for *_, i in ROWS])


def _run(model, batch, images, index, share: bool, rows_seen: list[int] | None = None):
    """Row log-probs and the gradients of their weighted sum; ``rows_seen`` collects the forwards' batch sizes."""
    handle = None
    if rows_seen is not None:
        handle = model.register_forward_pre_hook(lambda m, a, kw: rows_seen.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    model.zero_grad(set_to_none=True)
    try:
        logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], images, batch["labels"],
                                         index, prefix_sharing=share)
    finally:
        if handle is not None:
            handle.remove()
    logps = sequence_logps(logits, labels)
    (WEIGHTS * logps.float()).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach().float(), grads


def _assert_same(shared, unshared, dtype: torch.dtype) -> None:
    (lp, grads), (lp_ref, grads_ref) = shared, unshared
    atol, rel = TOLERANCE[dtype]
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=atol)
    assert grads.keys() == grads_ref.keys() and grads
    total = torch.sqrt(sum(g.norm() ** 2 for g in grads_ref.values()))
    err = torch.sqrt(sum((grads[n] - g).norm() ** 2 for n, g in grads_ref.items()))
    assert err <= rel * total, f"gradient error {err:.3e} of a gradient of size {total:.3e}"
    if dtype == torch.float32:
        for name, g in grads_ref.items():
            # Per tensor, with a floor for gradients that are zero in exact arithmetic (attention key biases).
            e = (grads[name] - g).norm()
            assert e <= rel * g.norm() + 1e-6, f"{name}: gradient error {e:.2e} of a gradient of size {g.norm():.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_shared_prefix_log_probs_and_gradients_equal_the_unshared_rows(family, dtype):
    model, processor = BUILDERS[family](dtype=dtype)
    model.train()
    batch, images, index = _batch(processor, dtype)
    unshared = _run(model, batch, images, index, share=False)
    seen: list[int] = []
    shared = _run(model, batch, images, index, share=True, rows_seen=seen)
    assert seen == [len(GROUPS)]  # one forward of the packed rows: the shared prefixes computed once
    _assert_same(shared, unshared, dtype)
    assert any("visual" in n or "vision_tower" in n for n in shared[1])  # the images' gradients too


def test_rows_are_grouped_by_image_and_prompt_and_positions_restart_after_the_prefix():
    model, processor = build_qwen25vl()
    batch, images, index = _batch(processor, torch.float32)
    ids, mask, labels = expand_image_rows(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          _image_token_id(model), images.tokens_per_image[index])
    plan = plan_packing(ids, mask, labels, [(int(i),) for i in index])
    assert plan.groups == GROUPS
    positions = family_of(model).row_position_ids(model, ids, mask, images, index)  # [3, N, T]: M-RoPE
    packed = gather_packed(positions, plan)
    g, (chosen, rejected, _third) = 0, GROUPS[0]
    p = int(plan.prefix[g])
    seg = plan.segment[g]
    start_of = {j: int((seg == j).nonzero()[0]) for j in (1, 2, 3)}
    top = int(positions[:, chosen, :p].max())
    for j in (1, 2, 3):  # each response's text positions continue from the prefix's largest, in all 3 axes
        assert packed[:, g, start_of[j]].tolist() == [top + 1] * 3
    # and equal the unpacked rows' own positions
    n_rej = int(mask[rejected].sum()) - p
    assert torch.equal(packed[:, g, start_of[2] : start_of[2] + n_rej], positions[:, rejected, p : p + n_rej])


def test_lora_and_gradient_checkpointing_share_exactly():
    """On Qwen2.5-VL (M-RoPE: the positions the packed row must carry); LoRA on LLaVA runs in the 4-bit test."""
    from peft import LoraConfig, get_peft_model

    for family in ("qwen2.5-vl",):
        model, processor = BUILDERS[family]()
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=family_of(model).lora_target_modules))
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would make every A gradient zero
                p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        batch, images, index = _batch(processor, torch.float32)
        unshared = _run(model, batch, images, index, share=False)
        shared = _run(model, batch, images, index, share=True)
        assert all("lora_" in n for n in shared[1])
        _assert_same(shared, unshared, torch.float32)
        with model.disable_adapter(), torch.no_grad():  # the reference forward: adapters off
            ref = [response_logits(model, batch["input_ids"], batch["attention_mask"], images, batch["labels"], index,
                                   prefix_sharing=s) for s in (False, True)]
        torch.testing.assert_close(sequence_logps(*ref[1]), sequence_logps(*ref[0]), rtol=0, atol=1e-4)


def test_4bit_base_gradients_share_exactly():
    pytest.importorskip("bitsandbytes")
    from misp.models import LoraSpec, VLMSpec, load_vlm
    from misp.testing.llava15 import save_hub_files

    with tempfile.TemporaryDirectory() as tmp:
        model, processor = _llava()
        save_hub_files(model, processor, tmp)
        model, processor = load_vlm(VLMSpec(path=tmp, load_in_4bit=True, lora=LoraSpec(r=4, alpha=8, dropout=0.0)))
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    batch, images, index = _batch(processor, torch.float32)
    unshared = _run(model, batch, images, index, share=False)
    shared = _run(model, batch, images, index, share=True)
    assert any("lora_A" in n and g.norm() > 0 for n, g in shared[1].items())  # backward through the 4-bit layers
    _assert_same(shared, unshared, torch.float32)


def test_under_fsdp_sharing_equals_the_unshared_rows(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    model, processor = build_qwen25vl()
    family = family_of(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True,
                       auto_wrap_policy=functools.partial(lambda_auto_wrap_policy, lambda_fn=family.is_block))
        wrapped.train()
        batch, images, index = _batch(processor, torch.float32)
        unshared = _run(wrapped, batch, images, index, share=False)
        seen: list[int] = []
        shared = _run(wrapped, batch, images, index, share=True, rows_seen=seen)
        assert seen == [len(GROUPS)]
        _assert_same(shared, unshared, torch.float32)
    finally:
        dist.destroy_process_group()


def test_where_the_mask_is_not_exact_the_unshared_rows_run_and_the_reason_is_logged(caplog, monkeypatch):
    monkeypatch.setattr(prefix_sharing, "_logged", set())  # each reason is logged once per process
    model, processor = build_gemma3()
    model.config.get_text_config().sliding_window = 8  # shorter than the rows: one 4-D mask cannot express it
    model.train()
    batch, images, index = _batch(processor, torch.float32)
    unshared = _run(model, batch, images, index, share=False)
    seen: list[int] = []
    with caplog.at_level(logging.WARNING, logger="misp.models.prefix_sharing"):
        shared = _run(model, batch, images, index, share=True, rows_seen=seen)
    assert seen == [len(ROWS)]
    assert "sliding window" in caplog.text
    torch.testing.assert_close(shared[0], unshared[0], rtol=0, atol=0)


def test_left_padded_rows_and_rows_sharing_nothing_run_unshared():
    ids = torch.tensor([[0, 0, 5, 6, 7], [0, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    assert plan_packing(ids, mask, labels, [(0,), (0,)]) is None  # left padding: not packed
    ids = torch.tensor([[5, 6, 7, 9], [5, 6, 8, 9]])
    labels = torch.tensor([[-100, -100, 7, 9], [-100, -100, 8, 9]])
    plan = plan_packing(ids, torch.ones_like(ids), labels, [(0,), (1,)])  # same tokens, other images
    assert not plan.shares and plan.groups == [[0], [1]]
    plan = plan_packing(ids, torch.ones_like(ids), labels, [(0,), (0,)])
    assert plan.shares and plan.groups == [[0, 1]] and plan.segment[0].tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "gemma-3"])
def test_rows_of_several_images_share_when_all_their_images_and_prompt_agree(family):
    """Two-image prompts: the rows that hold the same two images and prompt pack together (the packed row's
    image slots are its prefix's), one holding the images in another order does not; Gemma 3's
    bidirectional attention stays within each image."""
    two = "<image>\n<image>\nWhat differs between the two images?"
    rows = [(two, "The second one is larger.", (0, 1)), (two, "They are the same.", (0, 1)),
            (two, "The second one is larger.", (1, 0)), (PROMPTS[0], "A red circle.", (2,))]
    model, processor = BUILDERS[family]()
    model.train()
    batch = collate_examples([encode_example(processor, p, r) for p, r, _ in rows], processor.tokenizer.pad_token_id)
    images = prepare_images(processor, _images())
    index = torch.tensor([i for *_, ims in rows for i in ims])
    weights = torch.tensor([1.0, -0.5, 0.7, 0.3])

    def run(share: bool, seen: list[int]):
        handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
        model.zero_grad(set_to_none=True)
        try:
            logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], images,
                                             batch["labels"], index, prefix_sharing=share)
        finally:
            handle.remove()
        logps = sequence_logps(logits, labels)
        (weights * logps).sum().backward()
        return logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    seen_off, seen_on = [], []
    unshared, shared = run(False, seen_off), run(True, seen_on)
    assert seen_off == [4] and seen_on == [3]  # rows 0 and 1 packed; row 2 (images swapped) on its own
    _assert_same(shared, unshared, torch.float32)


def test_a_batch_where_packing_costs_more_tokens_runs_unshared(caplog, monkeypatch):
    """A short shared prefix beside long rows that share nothing: the packed layout would pad every row to the
    packed pair's length, so the unshared rows run (the same log-probs either way), and the reason is logged."""
    model, processor = build_llava15(SMALL_LLAVA)
    model.train()
    long = "a red circle at the top left, a blue square below it, and a green triangle at the right " * 2
    rows = [(0, "Yes, there is" + long, 0), (0, "No" + long, 0), (0, "Maybe.", 1), (0, "Maybe.", 2),
            (1, "Maybe.", 1), (1, "Maybe.", 2)]  # one pair; four rows of their own image and prompt
    examples = [encode_example(processor, PROMPTS[p], r) for p, r, _ in rows]
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    images = prepare_images(processor, _images())
    index = torch.tensor([i for *_, i in rows])
    ids, mask, labels = expand_image_rows(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          _image_token_id(model), images.tokens_per_image[index])
    plan = plan_packing(ids, mask, labels, [(int(i),) for i in index])
    assert plan.shares and len(plan.groups) * int(plan.lengths.max()) >= ids.numel()  # packing would cost more
    seen: list[int] = []
    monkeypatch.setattr(prefix_sharing, "_logged", set())  # logged once per process: an earlier test may have
    with caplog.at_level(logging.WARNING, logger="misp.models.prefix_sharing"):
        logits, _ = response_logits(model, batch["input_ids"], batch["attention_mask"], images, batch["labels"], index,
                                    prefix_sharing=True)
        model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
        response_logits(model, batch["input_ids"], batch["attention_mask"], images, batch["labels"], index,
                        prefix_sharing=True)
    assert seen == [len(rows)] and "more padded tokens" in caplog.text
    unshared, _ = response_logits(model, batch["input_ids"], batch["attention_mask"], images, batch["labels"], index)
    torch.testing.assert_close(logits, unshared, rtol=0, atol=0)


# --- padding-free: whole sequences bin-packed several to a row (response_logits(padding_free=True)) --------
LONG = "The image shows a red circle at the top left, a blue square below it and a green triangle at the right."
# Three long responses on the positive image (one long packed sequence), and four short rows on their own
# (negatives of other sizes, a second prompt): bin packing puts the short ones side by side.
PF_ROWS = [(0, LONG, 0), (0, "There is a blue square below a red circle and " + LONG, 0), (0, "No. " + LONG, 0),
           (0, "A circle.", 1), (1, "Yes.", 2), (1, "No, there is not.", 1), (0, "A square.", 2)]
PF_WEIGHTS = torch.tensor([1.0, -0.5, 0.7, 0.3, -1.2, 0.9, 0.4])


def _pf_batch(processor, dtype: torch.dtype, rows=PF_ROWS):
    examples = [encode_example(processor, PROMPTS[p], r) for p, r, _ in rows]
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    return batch, prepare_images(processor, _images()).to("cpu", dtype), torch.tensor([i for *_, i in rows])


def _pf_run(model, batch, images, index, weights, seen: list[tuple[int, int]] | None = None, **switches):
    """Row log-probs and gradients of their weighted sum; ``seen`` collects each forward's (rows, width)."""
    handle = None
    if seen is not None:
        handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    model.zero_grad(set_to_none=True)
    try:
        logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], images, batch["labels"],
                                         index, **switches)
    finally:
        if handle is not None:
            handle.remove()
    logps = sequence_logps(logits, labels)
    (weights * logps.float()).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach().float(), grads


@pytest.mark.parametrize(("family", "dtype"), [(f, torch.float32) for f in BUILDERS] + [("qwen2.5-vl", torch.bfloat16)],
                         ids=[f"{f}-float32" for f in BUILDERS] + ["qwen2.5-vl-bfloat16"])
def test_bin_packed_log_probs_and_gradients_equal_the_unshared_rows(family, dtype):
    model, processor = BUILDERS[family](dtype=dtype)
    model.train()
    batch, images, index = _pf_batch(processor, dtype)
    ids, mask, labels = expand_image_rows(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          _image_token_id(model), images.tokens_per_image[index])
    if family == "gemma-3":  # every row fits the sliding window, the packed rows do not: still exact (one 4-D mask)
        model.config.get_text_config().sliding_window = int(mask.sum(1).max())
    keys = [(int(i),) for i in index]
    shared = plan_packing(ids, mask, labels, keys)
    binned = plan_packing(ids, mask, labels, keys, padding_free=True)
    assert len(binned.rows) < len(shared.groups) == 5  # bin packing puts short sequences side by side
    unshared = _pf_run(model, batch, images, index, PF_WEIGHTS, prefix_sharing=False)
    seen: list[tuple[int, int]] = []
    packed = _pf_run(model, batch, images, index, PF_WEIGHTS, seen, prefix_sharing=True, padding_free=True)
    # One forward of the bin-packed rows: fewer rows and fewer positions than the unshared and the shared layouts.
    assert seen == [(len(binned.rows), binned.width)]
    assert len(binned.rows) * binned.width < min(ids.numel(), len(shared.groups) * shared.width)
    assert sum(len(r) > 1 for r in binned.rows) >= 1  # some packed row holds several sequences
    _assert_same(packed, unshared, dtype)


def _rows(lengths: list[int], prefix: list[int], shared_prefix: bool = False):
    """Right-padded synthetic rows: row i holds ``lengths[i]`` tokens, its first ``prefix[i]`` unscored;
    with ``shared_prefix`` every row starts with the same prefix tokens."""
    n, t = len(lengths), max(lengths)
    ids = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.arange(1, length + 1) if shared_prefix else torch.arange(1, length + 1) + 1000 * i
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    for i, p in enumerate(prefix):
        labels[i, :p] = -100
    return ids, mask, labels


def test_bin_packing_keeps_each_sequence_to_itself_with_its_own_positions():
    ids, mask, labels = _rows([9, 4, 3, 5], [3, 2, 2, 2])
    plan = plan_packing(ids, mask, labels, [(i,) for i in range(4)], padding_free=True)
    assert first_fit_decreasing([9, 4, 3, 5], 9) == [[0], [3, 1], [2]]
    assert plan.rows == [[0], [3, 1], [2]] and plan.width == 9 and plan.lengths.tolist() == [9, 9, 3]
    positions = gather_packed(ModelFamily.row_position_ids(None, None, ids, mask, None, None), plan)
    assert positions[1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]  # row 3 then row 1, each from 0
    allow = block_mask(plan)[1, 0]
    seq = plan.sequence[1]
    assert seq.tolist() == [3] * 5 + [1] * 4
    assert torch.equal(allow, torch.ones(9, 9, dtype=torch.bool).tril() & (seq[:, None] == seq[None, :]))
    assert torch.equal(gather_packed(ids, plan)[1, :9], torch.cat([ids[3, :5], ids[1, :4]]))
    # Every unpacked position maps to where its token sits.
    for n in range(4):
        length = int(mask[n].sum())
        assert torch.equal(gather_packed(ids, plan)[plan.group_of[n], plan.packed_at[n, :length]], ids[n, :length])


def test_the_cheapest_layout_runs_per_batch():
    weight = 0.003125  # the tiny LLaVA's attention_pair_weight
    keys = [(0,)] * 4

    def choose(ids, mask, labels, share=True, padding_free=True):
        return choose_layout(ids, mask, labels, keys[: len(ids)], share, padding_free, weight)

    # Rows of different lengths sharing nothing: three short rows fit beside each other, 2 rows instead of 4.
    rows = _rows([40, 12, 10, 15], [5, 5, 5, 5])
    plan = choose(*rows)
    assert plan is not None and plan.rows == [[0], [3, 1, 2]]
    assert choose(*rows, padding_free=False) is None  # nothing shared: the padded rows as before
    # Rows of one length: nothing to pack, the unshared rows run (a tie goes to the simpler layout).
    assert choose(*_rows([20, 20, 20], [5, 5, 5])) is None
    # A short shared prefix before long responses: the packed pair runs fewer tokens (130 < 140) but more
    # attention pairs (130^2 > 2 x 70^2), and costs more in all: the unshared rows run. The token-only rule
    # (padding_free off, kept for bitwise reproducibility) packs it.
    rows = _rows([70, 70], [10, 10], shared_prefix=True)
    assert layout_cost(1, 130, weight) > layout_cost(2, 70, weight)
    assert choose(*rows) is None
    assert choose(*rows, padding_free=False).groups == [[0, 1]]
    # A long shared prefix (an image) and short rows beside it: the shared pair and the short rows bin-packed.
    ids, mask, labels = _rows([60, 60, 20, 25], [50, 50, 10, 10], shared_prefix=True)
    ids[2:, :10] += 500  # rows 2 and 3: another prompt each
    ids[3, :10] += 500
    plan = choose(ids, mask, labels)
    assert plan.groups == [[0, 1], [2], [3]] and plan.rows == [[0], [2, 1]]


def test_bin_packed_rows_of_several_images_take_their_images_in_order():
    """Qwen2.5-VL: a two-image pair with long responses and two short one-image rows. Sharing the pair's
    prefix would make one long row (more attention than it saves), so the rule bin-packs the rows as they
    are: the two short rows side by side, a packed row holding two rows' images in the order they sit."""
    two = "<image>\n<image>\nWhat differs between the two images?"
    long = " and it is larger, brighter and closer to the top left corner than the first one" * 2
    rows = [(two, "The second one" + long, (0, 1)), (two, "The first one" + long, (0, 1)),
            (PROMPTS[0], "A red circle.", (2,)), (PROMPTS[1], "Yes.", (1,))]
    model, processor = build_qwen25vl()
    model.train()
    batch = collate_examples([encode_example(processor, p, r) for p, r, _ in rows], processor.tokenizer.pad_token_id)
    images = prepare_images(processor, _images())
    index = torch.tensor([i for *_, ims in rows for i in ims])
    weights = torch.tensor([1.0, -0.5, 0.7, 0.3])
    unshared = _pf_run(model, batch, images, index, weights)
    seen: list[tuple[int, int]] = []
    binned = _pf_run(model, batch, images, index, weights, seen, prefix_sharing=True, padding_free=True)
    ids, mask, _ = expand_image_rows(batch["input_ids"], batch["attention_mask"], None, _image_token_id(model),
                                     images.tokens_per_image[index])
    assert seen == [(3, int(mask.sum(1).max()))]  # 4 rows in 3, none longer than the longest row
    _assert_same(binned, unshared, torch.float32)
