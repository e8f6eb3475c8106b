"""The proposal q_phi (method.md 4.4) and its seeded, batch-independent per-epoch draws."""

from __future__ import annotations

import math
import time

import pytest
import torch

from misp.negatives.proposal import ProposalNet, draw_negatives, gather_log_q, record_key


def _features(r=5, m=7, f=4, seed=0):
    return torch.rand(r, m, f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_initial_proposal_is_uniform_and_formula_holds_after_training_moves_it():
    feats = _features()
    net = ProposalNet(num_features=4, eps=0.2, init_temperature=2.0).double()
    torch.testing.assert_close(net.log_probs(feats).exp(), torch.full((5, 7), 1 / 7, dtype=torch.float64))
    with torch.no_grad():
        net.w.copy_(torch.tensor([3.0, -2.0, 1.0, 0.5]))
        net.log_tau.fill_(math.log(0.5))
    expected = 0.8 * torch.softmax(feats @ net.w / 0.5, -1) + 0.2 / 7
    torch.testing.assert_close(net(feats).exp(), expected.detach())


def test_probabilities_sum_to_one_and_respect_the_floor():
    feats = _features(r=6, m=9) * 20  # sharp softmax, so the floor is what keeps q away from 0
    eps = 0.1
    net = ProposalNet(eps=eps).double()
    with torch.no_grad():
        net.w.copy_(torch.tensor([5.0, -4.0, 3.0, 2.0]))
    q = net.log_probs(feats).exp()
    torch.testing.assert_close(q.sum(-1), torch.ones(6, dtype=torch.float64))
    assert (q >= eps / 9 * (1 - 1e-12)).all()
    assert q.min() < eps / 9 * 1.01  # the floor is reached, not just respected loosely


def test_masks_give_minus_inf_and_floor_over_valid_entries():
    feats = _features(r=3, m=5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    net = ProposalNet(eps=0.25).double()
    with torch.no_grad():
        net.w.copy_(torch.tensor([4.0, 1.0, -3.0, 2.0]))
    feats_garbage = feats.clone()
    feats_garbage[~mask] = float("nan")  # padded candidates must not leak in
    log_q = net.log_probs(feats_garbage, mask)
    assert torch.isneginf(log_q[~mask]).all()
    q = log_q.exp()
    torch.testing.assert_close(q.sum(-1), torch.ones(3, dtype=torch.float64))
    assert (q[1, [0, 2]] >= 0.25 / 2).all()
    assert q[2, 3].item() == pytest.approx(1.0)
    # Same values as the unpadded row on its own.
    torch.testing.assert_close(log_q[1, [0, 2]], net.log_probs(feats[1:2, [0, 2]])[0])
    log_q.masked_fill(~mask, 0).sum().backward()
    assert torch.isfinite(net.w.grad).all() and torch.isfinite(net.log_tau.grad)
    with pytest.raises(ValueError, match="at least one valid"):
        net.log_probs(feats, torch.zeros(3, 5, dtype=torch.bool))


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_eps_limits(eps):
    feats = _features(r=2, m=4)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]], dtype=torch.bool)
    net = ProposalNet(eps=eps).double()
    with torch.no_grad():
        net.w.fill_(2.0)
    log_q = net.log_probs(feats, mask)
    soft = torch.softmax((feats @ net.w).masked_fill(~mask, float("-inf")), -1)
    expected = soft if eps == 0.0 else mask / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(log_q.exp(), expected.detach().double())
    if eps < 1.0:  # at eps = 1 q no longer depends on phi
        log_q.masked_fill(~mask, 0).sum().backward()
        assert torch.isfinite(net.w.grad).all()


def test_bad_construction_and_input():
    with pytest.raises(ValueError, match="eps"):
        ProposalNet(eps=1.5)
    with pytest.raises(ValueError, match="temperature"):
        ProposalNet(init_temperature=0.0)
    with pytest.raises(ValueError, match="features"):
        ProposalNet().log_probs(torch.rand(2, 3, 5))


def _log_q(r=8, m=6, seed=0):
    return torch.log_softmax(torch.randn(r, m, generator=torch.Generator().manual_seed(seed)), -1)


def test_draws_repeat_for_same_seed_and_epoch_and_change_otherwise():
    log_q = _log_q(r=50)
    ids = [f"ex-{i}" for i in range(50)]
    d = draw_negatives(log_q, 4, seed=7, epoch=2, record_ids=ids)
    assert d.shape == (50, 4) and d.dtype == torch.long
    assert torch.equal(d, draw_negatives(log_q, 4, seed=7, epoch=2, record_ids=ids))
    assert (d != draw_negatives(log_q, 4, seed=7, epoch=3, record_ids=ids)).float().mean() > 0.5
    assert (d != draw_negatives(log_q, 4, seed=8, epoch=2, record_ids=ids)).float().mean() > 0.5
    # More draws extend the stream: the first K are unchanged.
    assert torch.equal(draw_negatives(log_q, 6, seed=7, epoch=2, record_ids=ids)[:, :4], d)


def test_draws_are_invariant_to_batch_order_split_and_other_rows():
    log_q = _log_q(r=20)
    ids = [f"rec/{i}" for i in range(20)]
    full = draw_negatives(log_q, 5, seed=1, epoch=0, record_ids=ids)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    permuted = draw_negatives(log_q[perm], 5, seed=1, epoch=0, record_ids=[ids[i] for i in perm])
    assert torch.equal(permuted, full[perm])
    halves = [draw_negatives(log_q[s], 5, 1, 0, ids[s]) for s in (slice(0, 7), slice(7, 20))]
    assert torch.equal(torch.cat(halves), full)
    # A record's draws depend on its own q row only.
    other = log_q.clone()
    other[1:] = _log_q(r=19, seed=9)
    assert torch.equal(draw_negatives(other, 5, 1, 0, ids)[0], full[0])


def test_draws_are_pinned_across_processes_and_versions():
    # Python's hash() is salted per process; the record hash must not be (BLAKE2b-64, little-endian).
    # The pinned draws also catch any change to the stream that would silently alter a resumed run.
    assert record_key("abc") == 0x5995D533D814BBD8
    log_q = torch.full((3, 1000), -math.log(1000.0))  # uniform over 1000: indices expose the uniforms
    ids = ["a", "b", "c"]
    assert draw_negatives(log_q, 4, seed=0, epoch=0, record_ids=ids).tolist() == [
        [108, 9, 686, 328],
        [773, 584, 428, 946],
        [84, 640, 919, 731],
    ]
    assert draw_negatives(log_q, 4, seed=-5, epoch=3, record_ids=ids).tolist() == [
        [670, 260, 421, 857],
        [787, 230, 504, 182],
        [909, 188, 535, 506],
    ]


def test_invalid_candidates_are_never_drawn():
    log_q = torch.log(torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]))
    d = draw_negatives(log_q, 2000, seed=3, epoch=1, record_ids=["x", "y"])
    assert set(d[0].unique().tolist()) == {1, 3}
    assert (d[1] == 4).all()
    with pytest.raises(ValueError, match="positive probability"):
        draw_negatives(torch.full((1, 3), float("-inf")), 2, 0, 0, ["z"])
    with pytest.raises(ValueError, match="record ids"):
        draw_negatives(log_q, 2, 0, 0, ["x"])


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(len(counts) - 1), dtype=torch.float64)
    return torch.special.gammaincc(dof / 2, stat / 2).item()  # chi-square survival function


def test_empirical_frequencies_match_q():
    q = torch.tensor([0.02, 0.08, 0.1, 0.3, 0.05, 0.45], dtype=torch.float64)
    r, k = 20_000, 5
    ids = [f"img{i:06d}" for i in range(r)]
    d = draw_negatives(q.log().expand(r, -1), k, seed=11, epoch=4, record_ids=ids)
    counts = torch.bincount(d.flatten(), minlength=6).double()
    assert _chi2_pvalue(counts, q) > 1e-3
    # Across epochs for one record as well.
    one = torch.cat([draw_negatives(q.log()[None], 50, 11, e, ["solo"]) for e in range(400)], 1)
    assert _chi2_pvalue(torch.bincount(one.flatten(), minlength=6).double(), q) > 1e-3
    # The test has power: a wrong distribution is rejected.
    assert _chi2_pvalue(counts, q.flip(0)) < 1e-10


def test_hundred_thousand_records_draw_quickly():
    r = 100_000
    log_q = torch.log_softmax(torch.randn(r, 16), -1)
    ids = [f"coco-{i}" for i in range(r)]
    start = time.perf_counter()
    d = draw_negatives(log_q, 3, seed=0, epoch=5, record_ids=ids)
    assert time.perf_counter() - start < 3.0
    assert d.shape == (r, 3) and d.min() >= 0 and d.max() < 16


def test_gather_log_q():
    log_q = _log_q(r=3, m=5)
    idx = torch.tensor([[0, 0, 4], [2, 1, 3], [4, 4, 4]])
    got = gather_log_q(log_q, idx)
    expected = torch.stack([log_q[i, idx[i]] for i in range(3)])
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError):
        gather_log_q(log_q, idx[:2])


def test_temperature_is_one_dimensional_and_old_scalar_checkpoints_load():
    """FSDP refuses 0-d parameters, so log_tau is [1]; checkpoints from before keep loading."""
    net = ProposalNet(num_features=3, init_temperature=2.0)
    assert all(p.dim() >= 1 for p in net.parameters())
    old = {"w": torch.tensor([0.1, 0.2, 0.3]), "log_tau": torch.tensor(math.log(0.5))}
    net.load_state_dict(old)
    assert net.temperature.dim() == 0 and net.temperature.item() == pytest.approx(0.5)
