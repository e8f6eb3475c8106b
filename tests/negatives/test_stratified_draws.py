"""The sae_targets source's stratified draws: one target negative every epoch, the importance weights still
unbiased for the pool's partition function, the selection keeping the targets, and the method check."""

from __future__ import annotations

import math

import pytest
import torch

from misp.dpo.method import Method, MethodError
from misp.dpo.terms import PlackettLuce, ProposalFit, TextDPO
from misp.negatives.proposal import draw_negatives, gather_log_q
from misp.negatives.selection import greedy_diverse_select
from misp.negatives.stratified import draw_stratified

M = 6
LOG_Q = torch.log_softmax(torch.tensor([[0.3, -1.2, 0.8, 0.1, -0.4, 1.5]]), 1)
A_VALUES = torch.tensor([[-0.5, 1.0, -2.0, 0.4, -1.0, 0.2]])
# the target stratum holds a low-proposal candidate (index 1): drawn by q alone it would come up rarely
STRATUM = torch.tensor([[False, True, False, False, True, False]])


def _z_hat(index: torch.Tensor, log_q_eff: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The image term's estimate (1/K) sum_k exp(a_k - log q_k) (misp.losses.plackett_luce_loss)."""
    return (a.gather(1, index) - log_q_eff).exp().mean(1)


def test_the_stratified_estimate_of_the_partition_function_is_unbiased():
    n, k = 40_000, 3
    ids = [f"r{i}" for i in range(n)]
    index, log_q_eff = draw_stratified(LOG_Q.expand(n, M), STRATUM.expand(n, M), k, seed=0, epoch=0, record_ids=ids)
    z_hat = _z_hat(index, log_q_eff, A_VALUES.expand(n, M).double())
    z = A_VALUES.double().exp().sum()
    se = z_hat.std() / math.sqrt(n)
    assert abs(float(z_hat.mean() - z)) < 4 * float(se), (float(z_hat.mean()), float(z), float(se))
    # every record drew one target first, and none among the other K-1
    assert bool(STRATUM[0, index[:, 0]].all()) and not bool(STRATUM[0, index[:, 1:]].any())


def test_the_stratified_estimate_has_less_variance_than_plain_draws_when_a_target_dominates():
    # the target's exp(a) is most of Z but q rarely draws it: plain IS is noisy, one forced draw is not
    n, k = 20_000, 3
    a = torch.tensor([[-2.0, 2.5, -2.0, -1.5, -3.0, -2.5]]).double()
    stratum = torch.tensor([[False, True, False, False, False, False]])
    ids = [f"r{i}" for i in range(n)]
    strat = _z_hat(*draw_stratified(LOG_Q.expand(n, M), stratum.expand(n, M), k, 0, 0, ids), a.expand(n, M))
    plain_index = draw_negatives(LOG_Q.expand(n, M), k, 0, 0, ids)
    plain = _z_hat(plain_index, gather_log_q(LOG_Q.expand(n, M).double(), plain_index), a.expand(n, M))
    assert float(strat.var()) < 0.2 * float(plain.var())


def test_rows_without_both_strata_and_k1_draw_as_plain_q():
    ids = ["a", "b", "c"]
    log_q = LOG_Q.expand(3, M).clone()
    stratum = torch.zeros(3, M, dtype=torch.bool)
    stratum[1] = True  # everything a target: no other stratum
    stratum[2, 1] = True  # a proper split
    index, log_q_eff = draw_stratified(log_q, stratum, 3, 5, 2, ids)
    plain = draw_negatives(log_q, 3, 5, 2, ids)
    assert torch.equal(index[:2], plain[:2])
    torch.testing.assert_close(log_q_eff[:2], gather_log_q(log_q.double(), plain)[:2], rtol=0, atol=1e-12)
    assert int(index[2, 0]) == 1 and not bool(stratum[2, index[2, 1:]].any())
    one, eff1 = draw_stratified(log_q, stratum, 1, 5, 2, ids)
    assert torch.equal(one, draw_negatives(log_q, 1, 5, 2, ids))


def test_a_records_draws_depend_on_its_id_seed_and_epoch_only():
    stratum = STRATUM.expand(4, M)
    ids = ["x", "y", "z", "w"]
    index, eff = draw_stratified(LOG_Q.expand(4, M), stratum, 3, 1, 0, ids)
    again, eff2 = draw_stratified(LOG_Q.expand(2, M), stratum[:2], 3, 1, 0, ["z", "x"])
    assert torch.equal(again, index[[2, 0]]) and torch.equal(eff2, eff[[2, 0]])
    other = torch.stack([draw_stratified(LOG_Q.expand(4, M), stratum, 3, 1, e, ids)[0] for e in range(1, 6)])
    assert not bool((other == index).all())


def test_pinned_candidates_are_selected_first_even_with_low_scores():
    torch.manual_seed(0)
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, -9.0, -8.0]])
    latents = torch.rand(1, 6, 4)
    valid = torch.ones(1, 6, dtype=torch.bool)
    pinned = torch.tensor([[False, False, False, False, True, True]])
    plain, _ = greedy_diverse_select(scores, latents, valid, 3)
    chosen, gains = greedy_diverse_select(scores, latents, valid, 3, pinned=pinned)
    assert 4 not in plain[0].tolist() and 5 not in plain[0].tolist()
    assert chosen[0, :2].tolist() == [5, 4]  # the pinned, best first, then the greedy fill
    assert int(chosen[0, 2]) not in (4, 5) and gains[0, 0] == 1.0
    # with no pinned candidate left (or none at all) the selection is the plain one
    none = torch.zeros_like(pinned)
    assert torch.equal(greedy_diverse_select(scores, latents, valid, 3, pinned=none)[0], plain)


def test_the_jackknife_on_stratified_draws_is_refused():
    with pytest.raises(MethodError, match="stratum"):
        Method(beta=0.5, terms={"image": PlackettLuce(importance_sampling=True, estimator="jackknife"),
                                "text": TextDPO(), "proposal": ProposalFit()},
               negatives={"source": "sae_targets", "k": 3})
    Method(beta=0.5, terms={"image": PlackettLuce(importance_sampling=True), "text": TextDPO(),
                            "proposal": ProposalFit()}, negatives={"source": "sae_targets", "k": 3})
