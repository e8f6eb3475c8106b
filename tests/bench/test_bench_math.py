"""Benchmarks whose numbers are mathematics: the estimator bench measures misp's own loss with gradients autograd
agrees with, and the prefix-sharing mechanisms give the unshared log-probs and gradients."""

from __future__ import annotations

import torch

from bench.estimators import ESTIMATORS, estimates, full_pool, measure, proposal
from misp.losses import plackett_luce_loss


def _setup(p=6, m=8, r=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = -1.0 + 1.5 * torch.randn(p, m, generator=g, dtype=torch.float64)
    q = proposal("learned", a, 0.1, g)
    index = torch.multinomial(q.repeat_interleave(r, 0), k, replacement=True, generator=g).reshape(p, r, k)
    return a, q, index


def test_plugin_is_misps_importance_sampled_loss():
    a, q, index = _setup()
    loss, _ = estimates("plugin", a, q, index)
    p, r, k = index.shape
    a_d = a.unsqueeze(1).expand(p, r, a.shape[1]).gather(-1, index).reshape(p * r, k)
    log_q = q.log().unsqueeze(1).expand(p, r, a.shape[1]).gather(-1, index).reshape(p * r, k)
    zeros = torch.zeros(p * r, dtype=torch.float64)
    # a = beta * (policy_neg - policy_pos) with references 0 and beta 1.
    ours = plackett_luce_loss(zeros, a_d, zeros, torch.zeros_like(a_d), 1.0, log_q=log_q)
    torch.testing.assert_close(loss.reshape(-1), ours, rtol=1e-12, atol=1e-12)


def test_closed_form_gradients_match_autograd():
    a, q, index = _setup()
    for name in ESTIMATORS:
        leaf = a.clone().requires_grad_(True)
        loss, grad = estimates(name, leaf, q, index)
        for i in range(index.shape[0]):
            for j in range(index.shape[1]):
                (auto,) = torch.autograd.grad(loss[i, j], leaf, retain_graph=True)
                torch.testing.assert_close(grad[i, j], auto[i], rtol=1e-10, atol=1e-12, msg=name)


def test_full_pool_gradient_is_the_derivative_of_the_full_pool_loss():
    a, _, _ = _setup()
    leaf = a.clone().requires_grad_(True)
    truth = full_pool(leaf)
    (g_img,) = torch.autograd.grad(truth["img_loss"].sum(), leaf)
    (g_sum,) = torch.autograd.grad(truth["sum_loss"].sum(), leaf)
    torch.testing.assert_close(truth["img_grad"], g_img, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(truth["sum_grad"], g_sum, rtol=1e-12, atol=1e-12)


def test_the_variance_minimising_proposal_makes_the_plugin_exact():
    g = torch.Generator().manual_seed(1)
    a = -2.0 + 2.0 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    q = torch.softmax(a, -1)  # exp(a) with no floor: every weight exp(a_k) / q_k equals Z
    index = torch.multinomial(q.repeat_interleave(7, 0), 3, replacement=True, generator=g).reshape(4, 7, 3)
    loss, _ = estimates("plugin", a, q, index)
    torch.testing.assert_close(loss, full_pool(a)["img_loss"].unsqueeze(1).expand(4, 7), rtol=1e-12, atol=1e-12)


def test_bias_ordering_the_report_rests_on():
    g = torch.Generator().manual_seed(2)
    a = -2.0 + 3.0 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    result = measure(a, proposal("uniform", a, 0.1, g), 3, 2048, g)
    # Jensen: the plug-in log(1 + Z^) is biased low; the jackknife removes most of it; the sum form is
    # unbiased for its own objective (within Monte-Carlo noise: std / sqrt(2048) ~ 0.02 here).
    assert result["plugin"]["loss_rel_bias"] < -0.1
    assert abs(result["jackknife"]["loss_rel_bias"]) < 0.6 * abs(result["plugin"]["loss_rel_bias"])
    assert abs(result["sum form"]["loss_rel_bias"]) < 0.05


def test_prefix_sharing_mechanisms_give_the_unshared_logps_and_gradients():
    from bench.prefix_sharing import prefix_child

    cfg = {"seed": 0, "batch": 2, "prompt": 5, "response": 10, "width": 64, "layers": 1, "repeat": 1,
           "image_size": 56}
    res = prefix_child(cfg)
    for name in ("mask", "kv"):
        check = res["checks"][name]
        assert check["same_params"], name
        assert check["logps_max_abs_diff"] < 1e-5 * max(check["logps_scale"], 1.0), (name, check)
        assert check["grad_max_rel_diff"] < 1e-4, (name, check)
    assert set(res["times"]) == {"unshared", "mask", "kv"}
