"""Numerical checks of the preference losses against their definitions (method.md sections 1 and 4.5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from misp.losses import (
    anchor_loss,
    dpo_loss,
    image_advantages,
    importance_weight_stats,
    plackett_luce_loss,
    proposal_loss,
)
from misp.negatives.proposal import ProposalNet

D = torch.float64


def _logps(b: int, k: int | None = None, scale: float = 3.0, gen: torch.Generator | None = None):
    shape = (b,) if k is None else (b, k)
    return (torch.randn(shape, dtype=D, generator=gen) * scale - 20.0).requires_grad_()


def _pl_from_advantages(a: torch.Tensor, log_q: torch.Tensor | None = None, beta: float = 0.5):
    """Call plackett_luce_loss so that its advantages are exactly ``a`` (zero reference, zero positive)."""
    b = a.shape[0]
    zeros = torch.zeros(b, dtype=a.dtype)
    return plackett_luce_loss(zeros, a / beta, zeros, torch.zeros_like(a), beta, log_q=log_q)


def test_dpo_loss_matches_definition_and_rewards_are_detached():
    torch.manual_seed(0)
    pc, pr, rc, rr = (_logps(6) for _ in range(4))
    beta = 0.3
    losses, cr, rjr = dpo_loss(pc, pr, rc, rr, beta)
    ref = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    torch.testing.assert_close(losses, ref)
    # Direct formula without logsigmoid, for values in a safe range.
    z = beta * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(losses, -torch.log(1 / (1 + torch.exp(-z))))
    torch.testing.assert_close(cr, beta * (pc - rc).detach())
    torch.testing.assert_close(rjr, beta * (pr - rr).detach())
    assert not cr.requires_grad and not rjr.requires_grad
    assert losses.shape == (6,)


def test_dpo_loss_rejects_bad_input():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, 0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, torch.zeros(4), x, x, 0.1)


def test_anchor_loss_matches_definition():
    torch.manual_seed(1)
    pc, rc = _logps(5), _logps(5)
    torch.testing.assert_close(anchor_loss(pc, rc, 0.1), -F.logsigmoid(0.1 * (pc - rc)))
    torch.testing.assert_close(anchor_loss(pc, rc, 0.1, delta=0.7), -F.logsigmoid(0.1 * (pc - rc) - 0.7))


def test_image_advantages_definition():
    torch.manual_seed(2)
    pp, rp, pn, rn = _logps(4), _logps(4), _logps(4, 3), _logps(4, 3)
    a = image_advantages(pp, pn, rp, rn, 0.5)
    torch.testing.assert_close(a, 0.5 * ((pn - rn) - (pp - rp)[:, None]))
    with pytest.raises(ValueError, match="shape"):
        image_advantages(pp, pn, rp, rn[:, :2], 0.5)


def conditional_loss(pp, pn, rp, rn, beta):
    """mDPO's conditional loss, written out: ``-logsigmoid(beta [r(y_p|m_p) - r(y_p|m_1)])``."""
    return -F.logsigmoid(beta * ((pp - rp) - (pn - rn)))


def test_plackett_luce_with_one_negative_is_conditional_loss():
    torch.manual_seed(3)
    pp, rp, pn, rn = _logps(7), _logps(7), _logps(7, 1), _logps(7, 1)
    pl = plackett_luce_loss(pp, pn, rp, rn, 0.5)
    cond = conditional_loss(pp, pn[:, 0], rp, rn[:, 0], 0.5)
    a = image_advantages(pp, pn, rp, rn, 0.5)[:, 0]
    torch.testing.assert_close(pl, cond)
    torch.testing.assert_close(cond, F.softplus(a))


def _brute_force_pl(pp, pn, rp, rn, beta):
    """-log P(positive ranks first among {m_p} U S) under Plackett-Luce with scores s = beta * r."""
    s_p = beta * (pp - rp)
    s_n = beta * (pn - rn)
    out = []
    for b in range(pp.shape[0]):
        num = torch.exp(s_p[b])
        den = num + sum(torch.exp(s_n[b, i]) for i in range(pn.shape[1]))
        out.append(-torch.log(num / den))
    return torch.stack(out)


def test_plackett_luce_matches_enumerated_probability_and_its_gradients():
    torch.manual_seed(4)
    beta = 0.5
    pp, rp, pn, rn = _logps(5), _logps(5), _logps(5, 4), _logps(5, 4)
    loss = plackett_luce_loss(pp, pn, rp, rn, beta)
    ref = _brute_force_pl(pp, pn, rp, rn, beta)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss.sum(), [pp, pn, rp, rn])
    g_ref = torch.autograd.grad(ref.sum(), [pp, pn, rp, rn])
    for x, y in zip(g, g_ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    # The documented gradient: dL/da_i = sigmoid(LSE a) * softmax(a)_i.
    a = image_advantages(pp, pn, rp, rn, beta).detach().requires_grad_()
    (ga,) = torch.autograd.grad(_pl_from_advantages(a, beta=beta).sum(), [a])
    torch.testing.assert_close(ga, torch.sigmoid(a.logsumexp(-1, keepdim=True)) * a.softmax(-1))


def test_plackett_luce_gradcheck():
    torch.manual_seed(5)
    pp, rp, pn, rn = _logps(3, scale=1), _logps(3, scale=1), _logps(3, 4, scale=1), _logps(3, 4, scale=1)
    log_q = torch.log_softmax(torch.randn(3, 4, dtype=D), -1)
    assert torch.autograd.gradcheck(lambda *x: plackett_luce_loss(*x, 0.5), (pp, pn, rp, rn))
    assert torch.autograd.gradcheck(lambda *x: plackett_luce_loss(*x, 0.5, log_q=log_q), (pp, pn, rp, rn))


def test_is_correction_semantics():
    torch.manual_seed(6)
    a = torch.randn(4, 3, dtype=D)
    # log_q=None: plain L_img over exactly the drawn negatives.
    torch.testing.assert_close(_pl_from_advantages(a), F.softplus(a.logsumexp(-1)))
    # A uniform proposal over a pool of M scales the drawn mass by M / K.
    m = 10
    uniform = torch.full_like(a, -math.log(m))
    torch.testing.assert_close(_pl_from_advantages(a, uniform), F.softplus(a.logsumexp(-1) + math.log(m / 3)))
    # ... which is the uncorrected loss when the pool is the draws themselves (M = K).
    torch.testing.assert_close(
        _pl_from_advantages(a, torch.full_like(a, -math.log(3))), _pl_from_advantages(a)
    )


def _is_losses(a_pool: torch.Tensor, q: torch.Tensor, k: int, reps: int, seed: int):
    """``reps`` independent IS estimates with K draws each; returns (Z^ [reps], L_img^IS [reps])."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(q.expand(reps, -1), k, replacement=True, generator=gen)
    a = a_pool[idx]
    log_q = q.log()[idx]
    z_hat = torch.exp(a - log_q).mean(-1)
    return z_hat, _pl_from_advantages(a, log_q)


def test_is_estimate_with_uniform_proposal_is_consistent_and_variance_falls_as_one_over_k():
    torch.manual_seed(8)
    m = 24
    a_pool = torch.randn(m, dtype=D)
    z = a_pool.exp().sum()
    full = F.softplus(a_pool.logsumexp(0))
    q = torch.full((m,), 1.0 / m, dtype=D)
    sigma2 = (q * (a_pool.exp() / q) ** 2).sum() - z**2  # Var of one IS term under q
    reps = 4000

    z_k, l_k = _is_losses(a_pool, q, 32, reps, seed=1)
    z_4k, l_4k = _is_losses(a_pool, q, 128, reps, seed=2)
    # Z^ is unbiased: its mean sits within CLT bounds of Z.
    assert abs(z_4k.mean() - z) < 4 * math.sqrt(sigma2 / 128 / reps)
    # The loss is the plug-in log(1 + Z^): consistent, with an O(1/K) Jensen bias below Var/(1+Z)^2.
    bias_bound = (sigma2 / 128) / (1 + z) ** 2
    assert abs(l_4k.mean() - full) < 4 * l_4k.std() / math.sqrt(reps) + bias_bound
    assert l_4k.mean() <= full + 4 * l_4k.std() / math.sqrt(reps)  # concave plug-in: biased low
    # Exact 1/K law for Z^, and about 1/K on the loss scale (delta method).
    torch.testing.assert_close(z_k.var(), sigma2 / 32, rtol=0.15, atol=0)
    torch.testing.assert_close(z_4k.var(), sigma2 / 128, rtol=0.15, atol=0)
    assert 3.2 < (z_k.var() / z_4k.var()).item() < 5.0
    assert 3.2 < (l_k.var() / l_4k.var()).item() < 5.0


def test_is_estimate_is_exact_when_proposal_equals_model_preference():
    torch.manual_seed(9)
    a_pool = torch.randn(12, dtype=D) * 3
    p = torch.softmax(a_pool, 0)
    z_hat, loss = _is_losses(a_pool, p, 3, 500, seed=3)
    torch.testing.assert_close(z_hat, a_pool.exp().sum().expand(500), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss, F.softplus(a_pool.logsumexp(0)).expand(500), rtol=1e-12, atol=0)


def test_stability_at_extreme_advantages():
    big = 1e4
    for sign in (1.0, -1.0):
        pp = torch.zeros(2, requires_grad=True)
        pn = torch.full((2, 3), sign * big / 0.5, requires_grad=True)
        pn_q = torch.full((2, 3), sign * big / 0.5, requires_grad=True)
        zeros, zeros_k = torch.zeros(2), torch.zeros(2, 3)
        log_q = torch.log(torch.tensor([[0.1, 0.3, 0.6], [1e-30, 0.5, 0.5]]))
        losses = [
            plackett_luce_loss(pp, pn, zeros, zeros_k, 0.5),
            plackett_luce_loss(pp, pn_q, zeros, zeros_k, 0.5, log_q=log_q),
            conditional_loss(pp, pn[:, 0], zeros, zeros, 0.5),
            dpo_loss(pp, pn[:, 0], zeros, zeros, 0.5)[0],
            anchor_loss(pn[:, 0], zeros, 0.5),
        ]
        total = sum(x.sum() for x in losses)
        assert torch.isfinite(total)
        grads = torch.autograd.grad(total, [pp, pn, pn_q])
        assert all(torch.isfinite(g).all() for g in grads)
        expected_pl = big if sign > 0 else 0.0
        torch.testing.assert_close(
            losses[0], torch.full((2,), expected_pl + (math.log(3) if sign > 0 else 0.0))
        )
        a = torch.full((2, 3), sign * big)
        a[0, 0] += 1.0
        ess, wmax = importance_weight_stats(a, log_q)
        assert torch.isfinite(ess).all() and torch.isfinite(wmax).all()
        a_req = a.clone().requires_grad_()
        lq_phi = log_q.clone().requires_grad_()
        pl = proposal_loss(a_req, log_q, lq_phi)
        (g,) = torch.autograd.grad(pl.sum(), [lq_phi])
        assert torch.isfinite(pl).all() and torch.isfinite(g).all()


def test_importance_weight_stats_limits():
    k = 5
    equal = torch.full((3, k), 2.0)
    ess, wmax = importance_weight_stats(equal, torch.full((3, k), -1.0))
    torch.testing.assert_close(ess, torch.full((3,), float(k)))
    torch.testing.assert_close(wmax, torch.full((3,), 1.0 / k))
    dominant = torch.zeros(3, k)
    dominant[:, 2] = 200.0
    ess, wmax = importance_weight_stats(dominant, None)
    torch.testing.assert_close(ess, torch.ones(3))
    torch.testing.assert_close(wmax, torch.ones(3))
    # The proposal enters as 1/q: a draw with tiny q dominates even at equal advantages.
    log_q = torch.log(torch.tensor([[1e-9, 0.25, 0.25, 0.25, 0.25]]))
    ess, wmax = importance_weight_stats(torch.zeros(1, k), log_q)
    assert ess.item() == pytest.approx(1.0, abs=1e-6) and wmax.item() == pytest.approx(1.0, abs=1e-6)
    # Against the definition on random weights.
    a, lq = torch.randn(4, k, dtype=D), torch.randn(4, k, dtype=D)
    w = torch.exp(a - lq)
    ess, wmax = importance_weight_stats(a, lq)
    torch.testing.assert_close(ess, w.sum(-1) ** 2 / (w**2).sum(-1))
    torch.testing.assert_close(wmax, w.amax(-1) / w.sum(-1))


def test_proposal_loss_is_consistent_cross_entropy_and_ignores_a_gradient():
    torch.manual_seed(10)
    m = 8
    a_pool = torch.randn(m, dtype=D)
    p = a_pool.softmax(0)
    q0 = torch.softmax(torch.randn(m, dtype=D), 0)
    log_q_phi = torch.log_softmax(torch.randn(m, dtype=D), 0)
    gen = torch.Generator().manual_seed(0)
    idx = torch.multinomial(q0, 200_000, replacement=True, generator=gen)[None]
    a = a_pool[idx].requires_grad_()
    lq_phi = log_q_phi[idx].requires_grad_()
    loss = proposal_loss(a, q0.log()[idx], lq_phi)
    # Many draws: the self-normalised estimate approaches the cross-entropy -sum p log q_phi.
    assert loss.item() == pytest.approx(-(p * log_q_phi).sum().item(), abs=0.02)
    g_a, g_q = torch.autograd.grad(loss.sum(), [a, lq_phi], allow_unused=True)
    assert g_a is None or (g_a == 0).all()
    torch.testing.assert_close(-g_q.sum(-1), torch.ones(1, dtype=D))  # weights are normalised


def test_proposal_loss_drives_q_phi_towards_p_theta():
    torch.manual_seed(11)
    r, m, f, k = 64, 10, 4, 4
    feats = torch.rand(r, m, f)
    a_pool = 3.0 * feats @ torch.tensor([2.0, -1.0, 0.5, 1.5])  # model preference, in the family
    p = a_pool.softmax(-1)
    net = ProposalNet(num_features=f, eps=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)

    def kl() -> float:
        with torch.no_grad():
            return (p * (p.log() - net.log_probs(feats))).sum(-1).mean().item()

    kl_start = kl()
    gen = torch.Generator().manual_seed(0)
    for _epoch in range(30):
        with torch.no_grad():
            log_q_draw_all = net.log_probs(feats)  # frozen epoch-start proposal
        idx = torch.multinomial(log_q_draw_all.exp(), k, replacement=True, generator=gen)
        a = a_pool.gather(1, idx)
        log_q_draw = log_q_draw_all.gather(1, idx)
        for _ in range(10):
            opt.zero_grad()
            loss = proposal_loss(a, log_q_draw, net.log_probs(feats).gather(1, idx)).mean()
            loss.backward()
            opt.step()
    kl_end = kl()
    # Start is uniform; the eps floor keeps q from matching p exactly, but most of the gap closes.
    assert kl_start > 0.5
    assert kl_end < 0.3 * kl_start
