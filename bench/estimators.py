"""Bias and variance of the image-loss estimators against the full-pool loss and gradient.

The full-pool Plackett-Luce image loss of one example is ``L = log(1 + Z)``, ``Z = sum_i exp(a_i)`` over
its M pool negatives, and its gradient with respect to the advantages is ``g_i = exp(a_i) / (1 + Z)``
(every parameter gradient is ``sum_i g_i grad a_i``, so ``g`` is what an estimator must get right). A step
sees only K draws ``i_1..i_K ~ q`` and estimates both. Estimators, each written as ``Z^ = sum_k c_k
exp(a_{i_k})`` plugged into ``log(1 + Z^)`` unless said otherwise:

- ``plugin`` (misp today, method.md 4.5): ``c_k = 1 / (K q(i_k))``. ``Z^`` is unbiased, but ``log`` is
  concave, so ``E log(1 + Z^) <= log(1 + Z)``: the loss is biased low, and the gradient's ``1 / (1 + Z^)``
  is biased too.
- ``self-normalised``: ``c_k = M (1/q(i_k)) / sum_j (1/q(i_j))``, the SNIS estimate of ``M * mean_i exp(a_i)``.
- ``jackknife``: ``K f(Z^) - (K-1)/K sum_j f(Z^_{-j})`` with ``f = log(1 + .)``, which removes the
  ``O(1/K)`` term of the plug-in bias; its loss is misp's own ``PlackettLuce(estimator: jackknife)``.
- ``sum form``: the pairwise loss ``sum_i softplus(a_i)`` over the pool, estimated without bias by
  ``(1/K) sum_k softplus(a_{i_k}) / q(i_k)``. It is a different objective; its bias and spread are against
  its own full-pool value, and ``cos(g_sum, g_img)`` says how far its full-pool gradient points from L_img's.

Proposals: uniform; a noisy learned one, ``(1 - eps) softmax(0.5 a + xi) + eps/M`` with ``xi ~ N(0, 1)``
(what q_phi can reach from SAE features); ``exp(a / 2)`` and ``exp(a)`` with the floor eps (the issue's
``exp(a / tau)`` proposal; ``exp(a)`` is the variance-minimising one, which needs every pool advantage).
Advantage regimes follow the training diagnostics of docs/results-format5.md: early (the negatives still compete)
to late (solved: mean advantage -5).

Everything is float64 and closed-form (no model), so the numbers depend only on the seed.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from misp.losses import plackett_luce_loss

NAME = "estimators"

REGIMES = {"early": (-0.2, 0.5), "mid": (-2.0, 1.5), "late": (-5.0, 2.0), "heavy tail": (-2.0, 3.0)}
PROPOSALS = ("uniform", "learned", "exp(a/2)", "exp(a)")
ESTIMATORS = ("plugin", "self-normalised", "jackknife", "sum form")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("estimators")
    g.add_argument("--estimators-m", type=int, default=16, help="pool negatives per example (M)")
    g.add_argument("--estimators-k", type=int, default=3, help="draws per example (K)")
    g.add_argument("--estimators-pools", type=int, default=256, help="fixed examples per regime")
    g.add_argument("--estimators-replicates", type=int, default=4096, help="independent K-draws per example")
    g.add_argument("--estimators-eps", type=float, default=0.1, help="proposal floor eps (method.md 4.4)")


def proposal(name: str, a: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """``[P, M]`` proposal probabilities over each example's pool."""
    m = a.shape[-1]
    if name == "uniform":
        return torch.full_like(a, 1.0 / m)
    if name == "learned":
        logits = 0.5 * a + torch.randn(a.shape, generator=generator, dtype=a.dtype)
    elif name == "exp(a/2)":
        logits = a / 2
    elif name == "exp(a)":
        logits = a
    else:
        raise ValueError(f"unknown proposal {name!r}; choose from {PROPOSALS}")
    return (1 - eps) * torch.softmax(logits, -1) + eps / m


def full_pool(a: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full-pool losses and gradients of L_img and of the sum form, ``[P]`` and ``[P, M]``."""
    lse = torch.logsumexp(a, -1)
    return {
        "img_loss": torch.nn.functional.softplus(lse),
        "img_grad": torch.exp(a - torch.logaddexp(torch.zeros_like(lse), lse).unsqueeze(-1)),
        "sum_loss": torch.nn.functional.softplus(a).sum(-1),
        "sum_grad": torch.sigmoid(a),
    }


def _scatter(values: torch.Tensor, index: torch.Tensor, m: int) -> torch.Tensor:
    """Per-draw gradient contributions ``[P, R, K]`` summed into the pool ``[P, R, M]``."""
    out = values.new_zeros(*values.shape[:-1], m)
    return out.scatter_add_(-1, index, values)


def misp_image_loss(a_d: torch.Tensor, q_d: torch.Tensor, estimator: str) -> torch.Tensor:
    """misp's importance-sampled image loss (``misp.losses.plackett_luce_loss``) of draws ``[P, R, K]``, ``[P, R]``.

    The advantages enter as ``a = beta (negative - positive)`` with beta 1 and the positive and the references
    at 0, so the loss sees exactly ``a_d``.
    """
    p, r, k = a_d.shape
    a_flat = a_d.reshape(p * r, k)
    zeros = a_flat.new_zeros(p * r)
    log_q = q_d.log().reshape(p * r, k)
    return plackett_luce_loss(zeros, a_flat, zeros, torch.zeros_like(a_flat), 1.0, log_q=log_q,
                              estimator=estimator).reshape(p, r)


def estimates(name: str, a: torch.Tensor, q: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One estimator's loss ``[P, R]`` and pool gradient ``[P, R, M]`` from draws ``index [P, R, K]``."""
    p, m = a.shape
    r, k = index.shape[1:]
    a_d = a.unsqueeze(1).expand(p, r, m).gather(-1, index)
    q_d = q.unsqueeze(1).expand(p, r, m).gather(-1, index)
    if name == "sum form":
        loss = (torch.nn.functional.softplus(a_d) / q_d).mean(-1)
        return loss, _scatter(torch.sigmoid(a_d) / (k * q_d), index, m)
    w = torch.exp(a_d) / q_d
    if name in ("plugin", "self-normalised"):
        c = 1.0 / (k * q_d) if name == "plugin" else m * (1.0 / q_d) / (1.0 / q_d).sum(-1, keepdim=True)
        z = (c * torch.exp(a_d)).sum(-1)
        return torch.log1p(z), _scatter(c * torch.exp(a_d) / (1 + z).unsqueeze(-1), index, m)
    if name == "jackknife":
        if k < 2:
            raise ValueError("the jackknife needs K >= 2 draws")
        z = w.mean(-1)
        z_minus = (w.sum(-1, keepdim=True) - w) / (k - 1)  # [P, R, K]: Z^ without draw j
        # The loss is the one misp trains with (PlackettLuce(estimator: jackknife)); the closed-form gradient
        # below is checked against its autograd gradient (tests/bench/test_bench_math.py).
        loss = misp_image_loss(a_d, q_d, "jackknife")
        # d loss / d w_k = f'(Z^) - (1/K) sum_{j != k} f'(Z^_{-j}), and d w_k / d a_{i_k} = w_k.
        fprime_minus = 1.0 / (1 + z_minus)
        dw = 1.0 / (1 + z).unsqueeze(-1) - (fprime_minus.sum(-1, keepdim=True) - fprime_minus) / k
        return loss, _scatter(dw * w, index, m)
    raise ValueError(f"unknown estimator {name!r}; choose from {ESTIMATORS}")


def measure(a: torch.Tensor, q: torch.Tensor, k: int, replicates: int, generator: torch.Generator) -> dict[str, dict]:
    """Bias and spread of every estimator on the fixed examples ``a`` under proposal ``q``."""
    p, m = a.shape
    index = torch.multinomial(q.repeat_interleave(replicates, 0), k, replacement=True, generator=generator)
    index = index.reshape(p, replicates, k)
    truth = full_pool(a)
    out = {}
    for name in ESTIMATORS:
        loss, grad = estimates(name, a, q, index)
        target_loss, target_grad = (truth["sum_loss"], truth["sum_grad"]) if name == "sum form" else (
            truth["img_loss"], truth["img_grad"])
        g_norm = target_grad.norm(dim=-1)
        mean_grad = grad.mean(1)
        out[name] = {
            "loss_rel_bias": float(((loss.mean(1) - target_loss) / target_loss).mean()),
            "loss_rel_std": float((loss.std(1) / target_loss).mean()),
            "grad_rel_bias": float(((mean_grad - target_grad).norm(dim=-1) / g_norm).mean()),
            "grad_rel_rmse": float(((grad - target_grad.unsqueeze(1)).pow(2).sum(-1).mean(1).sqrt() / g_norm).mean()),
        }
    cos = torch.nn.functional.cosine_similarity(truth["sum_grad"], truth["img_grad"], dim=-1)
    out["sum form"]["cos_to_img_grad"] = float(cos.mean())
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every estimator x proposal x regime; returns the tables and the raw numbers."""
    m, k = args.estimators_m, args.estimators_k
    if m < 1 or k < 2 or args.estimators_pools < 1 or args.estimators_replicates < 2:
        raise ValueError("need --estimators-m >= 1, --estimators-k >= 2, --estimators-pools >= 1, "
                         "--estimators-replicates >= 2")
    if not 0 < args.estimators_eps <= 1:
        raise ValueError(f"--estimators-eps must lie in (0, 1], got {args.estimators_eps}")
    if args.quick:
        pools, replicates = 16, 256
    else:
        pools, replicates = args.estimators_pools, args.estimators_replicates
    generator = torch.Generator().manual_seed(0)
    rows, raw = [], []
    for regime, (mu, sigma) in REGIMES.items():
        a = mu + sigma * torch.randn(pools, m, generator=generator, dtype=torch.float64)
        for prop in PROPOSALS:
            q = proposal(prop, a, args.estimators_eps, generator)
            result = measure(a, q, k, replicates, generator)
            raw.append({"regime": regime, "mu": mu, "sigma": sigma, "proposal": prop, "result": result})
            for est, r in result.items():
                rows.append({"regime": regime, "proposal": prop, "estimator": est,
                             **{key: round(v, 4) for key, v in r.items()}})
    se = 1.0 / math.sqrt(replicates)
    return {
        "config": {"m": m, "k": k, "pools": pools, "replicates": replicates, "eps": args.estimators_eps},
        "raw": raw,
        "tables": [{
            "title": f"image-loss estimators against the full pool (M={m}, K={k}, {pools} examples x {replicates} "
                     f"draws each; relative to the full-pool value, mean over examples; Monte-Carlo noise on a "
                     f"bias is about rel_std x {se:.3f}); 'sum form' is against its own full-pool loss",
            "columns": [("regime", "advantages"), ("proposal", "proposal"), ("estimator", "estimator"),
                        ("loss_rel_bias", "loss bias"), ("loss_rel_std", "loss std"),
                        ("grad_rel_bias", "grad bias"), ("grad_rel_rmse", "grad rmse"),
                        ("cos_to_img_grad", "cos(g, g_img)")],
            "rows": rows,
        }],
    }
