"""gradient_shares against separate backward passes, and the advantage-spread metrics of PlackettLuce."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from misp.dpo.diagnostics import gradient_shares
from misp.dpo.objective import (
    PreferenceObjective,
    SequenceLogps,
    preference_loss,
    preference_terms,
    sum_terms,
)


def _net_and_losses(seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    out = net(torch.randn(11, 5))
    target = torch.randn(11, 3)
    return net, {"fit": ((out - target) ** 2).mean(), "small": 0.3 * out.abs().mean()}


def _brute_force(seed: int) -> dict[str, torch.Tensor]:
    """Each term's flat gradient from its own forward and backward into .grad (same seed: same weights, data)."""
    grads = {}
    for name in ("fit", "small"):
        net_i, losses = _net_and_losses(seed)
        losses[name].backward()
        grads[name] = torch.cat([p.grad.reshape(-1) for p in net_i.parameters()]).double()
    return grads


def test_norms_shares_and_cosine_match_separate_backwards():
    net, losses = _net_and_losses(0)
    got = gradient_shares(losses, list(net.parameters()))
    ref = _brute_force(0)
    g = ref["fit"] + ref["small"]
    for name, gi in ref.items():
        torch.testing.assert_close(got[name]["norm"], gi.norm(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[name]["share"], (gi @ g) / (g @ g), rtol=1e-5, atol=1e-6)
    cos = (ref["fit"] @ ref["small"]) / (ref["fit"].norm() * ref["small"].norm())
    torch.testing.assert_close(got["fit"]["cos"]["small"], cos, rtol=1e-5, atol=1e-6)
    assert got["small"]["cos"]["fit"] is got["fit"]["cos"]["small"]
    torch.testing.assert_close(got["fit"]["share"] + got["small"]["share"], torch.tensor(1.0, dtype=torch.float64))


def test_the_callers_gradients_and_graph_are_untouched():
    net, losses = _net_and_losses(1)
    gradient_shares(losses, list(net.parameters()))
    assert all(p.grad is None for p in net.parameters())
    sum(losses.values()).backward()  # the graph was retained for the step's own backward
    with_diag = [p.grad.clone() for p in net.parameters()]
    net2, losses2 = _net_and_losses(1)
    sum(losses2.values()).backward()
    for a, b in zip(with_diag, (p.grad for p in net2.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_single_term_has_share_one():
    net, losses = _net_and_losses(2)
    got = gradient_shares({"fit": losses["fit"]}, list(net.parameters()))
    torch.testing.assert_close(got["fit"]["share"], torch.tensor(1.0, dtype=torch.float64))
    assert got["fit"]["cos"] == {}


def test_conflicting_terms_give_a_negative_share():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    # d/dw: +3 [1, 1] and -1 [1, 1]: the second term is overruled by the first.
    got = gradient_shares({"push": 3 * w.sum(), "pull": -w.sum()}, [w])
    torch.testing.assert_close(got["push"]["share"], torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(got["pull"]["share"], torch.tensor(-0.5, dtype=torch.float64))
    torch.testing.assert_close(got["push"]["cos"]["pull"], torch.tensor(-1.0, dtype=torch.float64))


def test_a_term_without_a_path_to_the_params_gets_zero():
    w, other = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
    got = gradient_shares({"uses_w": (w**2).sum(), "elsewhere": other.sum()}, [w])
    assert got["elsewhere"]["norm"] == 0 and got["elsewhere"]["share"] == 0 and got["elsewhere"]["cos"]["uses_w"] == 0
    torch.testing.assert_close(got["uses_w"]["share"], torch.tensor(1.0, dtype=torch.float64))


def test_reduce_sees_every_gradient():
    # A stand-in all-reduce: the mean of this rank's gradient and a zero one halves every gradient,
    # which leaves shares and cosines alone and halves the norms.
    net, losses = _net_and_losses(3)
    plain = gradient_shares(losses, list(net.parameters()))
    net, losses = _net_and_losses(3)
    seen = []
    halved = gradient_shares(losses, list(net.parameters()), reduce=lambda g: seen.append(g.shape) or g / 2)
    assert len(seen) == 2 * len(list(net.parameters()))
    for name in losses:
        torch.testing.assert_close(halved[name]["norm"], plain[name]["norm"] / 2)
        torch.testing.assert_close(halved[name]["share"], plain[name]["share"])


def test_bad_inputs_are_refused():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="at least one loss"):
        gradient_shares({}, [w])
    with pytest.raises(ValueError, match="must be a scalar"):
        gradient_shares({"vector": w * 2}, [w])


def _logps(seed: int, b: int = 4, k: int = 3) -> SequenceLogps:
    g = torch.Generator().manual_seed(seed)
    return SequenceLogps(-torch.rand(b, generator=g) * 10, -torch.rand(b, generator=g) * 10, -torch.rand(b, k, generator=g) * 10)


def test_preference_terms_sum_to_preference_loss_bitwise_and_log_the_advantage_spread():
    objective = PreferenceObjective.preset("mdpo")
    policy, reference = _logps(0), _logps(1)
    loss, metrics = preference_loss(objective, policy, reference)
    terms, _ = preference_terms(objective, policy, reference)
    assert list(terms) == ["text", "image", "anchor"]
    torch.testing.assert_close(sum_terms(terms).mean(), loss, rtol=0, atol=0)
    a = objective.beta * ((policy.negatives - reference.negatives) - (policy.chosen - reference.chosen)[:, None])
    torch.testing.assert_close(metrics["img/advantage_std"], a.std(correction=0))
    torch.testing.assert_close(metrics["img/advantage_p10"], a.flatten().quantile(0.1))
    torch.testing.assert_close(metrics["img/advantage_p90"], a.flatten().quantile(0.9))
