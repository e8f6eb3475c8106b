"""sequence_logps against a token-by-token loop, with masking, chunking, bf16 and gradients."""

from __future__ import annotations

import pytest
import torch

from misp.logprobs import IGNORE_INDEX, response_token_counts, sequence_logps


def _batch(n=3, t=7, v=11, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, dtype=dtype, generator=gen) * 3
    labels = torch.randint(0, v, (n, t), generator=gen)
    labels[0, :3] = IGNORE_INDEX  # prompt
    labels[1, ::2] = IGNORE_INDEX  # interleaved (image tokens, padding)
    labels[2, -2:] = IGNORE_INDEX  # right padding
    return logits, labels


def _loop_reference(logits, labels, average=False):
    out = []
    for i in range(logits.shape[0]):
        total, count = logits.new_zeros(()), 0
        for t in range(1, logits.shape[1]):
            if labels[i, t] == IGNORE_INDEX:
                continue
            total = total + torch.log_softmax(logits[i, t - 1], -1)[labels[i, t]]
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.stack(out)


@pytest.mark.parametrize("chunk_rows", [None, 1, 4])
def test_matches_token_loop_values_and_gradients(chunk_rows):
    logits, labels = _batch()
    logits.requires_grad_()
    for average in (False, True):
        got = sequence_logps(logits, labels, average=average, chunk_rows=chunk_rows)
        ref = _loop_reference(logits, labels, average=average)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        w = torch.tensor([0.3, -1.2, 2.0], dtype=logits.dtype)
        (g,) = torch.autograd.grad((got * w).sum(), [logits])
        (g_ref,) = torch.autograd.grad((ref * w).sum(), [logits])
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    logits, labels = _batch(n=3, t=5, v=4)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sequence_logps(x, labels, chunk_rows=3), (logits,))


def test_ignored_positions_do_not_matter_and_first_label_is_never_scored():
    logits, labels = _batch()
    base = sequence_logps(logits, labels)
    other = logits.clone()
    # Logits at position t score label t+1; change only logits whose next label is ignored, and the last.
    for i in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[i, t + 1] == IGNORE_INDEX:
                other[i, t] = torch.randn_like(other[i, t]) * 10
    other[:, -1] = 123.0
    relabelled = labels.clone()
    relabelled[:, 0] = 5  # position 0 has no predecessor, never scored
    torch.testing.assert_close(sequence_logps(other, relabelled), base)


def test_all_masked_rows_give_zero_and_no_gradient():
    logits, labels = _batch()
    labels[1] = IGNORE_INDEX
    labels[2, 1:] = IGNORE_INDEX  # only the unscorable first label remains
    logits.requires_grad_()
    for average in (False, True):
        out = sequence_logps(logits, labels, average=average)
        assert out[1].item() == 0.0 and out[2].item() == 0.0
        (g,) = torch.autograd.grad(out.sum(), [logits])
        assert (g[1:] == 0).all()
    everything = torch.full_like(labels, IGNORE_INDEX)
    assert (sequence_logps(logits, everything) == 0).all()


def test_counts_and_average():
    logits, labels = _batch()
    counts = response_token_counts(labels)
    expected = torch.tensor([(labels[i, 1:] != IGNORE_INDEX).sum().item() for i in range(3)])
    assert torch.equal(counts, expected)
    torch.testing.assert_close(
        sequence_logps(logits, labels, average=True), sequence_logps(logits, labels) / counts.to(logits.dtype)
    )


def test_bf16_is_upcast_per_chunk():
    logits32, labels = _batch(v=50, dtype=torch.float32, seed=1)
    logits = logits32.to(torch.bfloat16).requires_grad_()
    out = sequence_logps(logits, labels, chunk_rows=2)
    assert out.dtype == torch.float32
    ref_in = logits.detach().double().requires_grad_()
    ref = _loop_reference(ref_in, labels)
    # The bf16 values are exact inputs; only float32 accumulation separates the two.
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
    (g,) = torch.autograd.grad(out.sum(), [logits])
    (g_ref,) = torch.autograd.grad(ref.sum(), [ref_in])
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-2, atol=1e-2)


def test_bad_input_raises():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="labels must be"):
        sequence_logps(logits, labels[:, :-1])
    bad = labels.clone()
    bad[0, -1] = 99
    with pytest.raises(ValueError, match="outside"):
        sequence_logps(logits, bad)
    with pytest.raises(ValueError, match="logits must be"):
        sequence_logps(logits[0], labels)
