"""The jackknife estimator of the importance-sampled image loss (``PlackettLuce(estimator: jackknife)``,
method.md 4.5): its formula, its bias against the full-pool loss, its method check, its ablation configs, and
the plug-in default left exactly as it was."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from misp.cli import main
from misp.demo import method_configs
from misp.dpo.method import Method, MethodError, build_method
from misp.dpo.terms import Cooling, PlackettLuce, SequenceLogps, TermInputs
from misp.losses import image_advantages, plackett_luce_loss
from misp.negatives.spec import Negatives

ROOT = Path(__file__).resolve().parents[2]
F64 = torch.float64


def _batch(b: int = 4, k: int = 3, seed: int = 0, dtype=F64):
    """Policy/reference log-probs of a fixed batch and the draws' proposal log q (each row's q a distribution)."""
    g = torch.Generator().manual_seed(seed)
    pp, rp = -5 + torch.randn(b, generator=g, dtype=dtype), -5 + torch.randn(b, generator=g, dtype=dtype)
    pn, rn = -6 + 2 * torch.randn(b, k, generator=g, dtype=dtype), -6 + 2 * torch.randn(b, k, generator=g, dtype=dtype)
    log_q = torch.log_softmax(torch.randn(b, 7, generator=g, dtype=dtype), -1)[:, :k]
    return pp, pn, rp, rn, log_q


def _loss_of_advantages(a: torch.Tensor, log_q: torch.Tensor, estimator: str) -> torch.Tensor:
    """``plackett_luce_loss`` with advantages exactly ``a`` (beta 1, positive and references at 0)."""
    zeros = a.new_zeros(a.shape[0])
    return plackett_luce_loss(zeros, a, zeros, torch.zeros_like(a), 1.0, log_q=log_q, estimator=estimator)


def _brute_force_jackknife(a: list[float], log_q: list[float]) -> float:
    """The formula of method.md 4.5 written out draw by draw, in Python floats."""
    k = len(a)
    w = [math.exp(ai - lq) for ai, lq in zip(a, log_q, strict=True)]
    z = sum(w) / k
    z_minus = [(sum(w) - w[j]) / (k - 1) for j in range(k)]
    return k * math.log1p(z) - (k - 1) / k * sum(math.log1p(zj) for zj in z_minus)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_jackknife_is_the_formula_in_value_and_gradient(k):
    pp, pn, rp, rn, log_q = _batch(k=k, seed=k)
    beta = 0.7
    leaves = [t.clone().requires_grad_(True) for t in (pp, pn, rp, rn)]
    ours = plackett_luce_loss(*leaves, beta, log_q=log_q, estimator="jackknife")
    a = image_advantages(pp, pn, rp, rn, beta)
    expected = torch.tensor([_brute_force_jackknife(a[i].tolist(), log_q[i].tolist()) for i in range(a.shape[0])],
                            dtype=F64)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-12, atol=1e-12)

    # Gradient: autograd of ours against autograd of the naive transcription (explicit exponentials, fine at
    # these magnitudes), and against finite differences.
    naive_leaves = [t.clone().requires_grad_(True) for t in (pp, pn, rp, rn)]
    w = torch.exp(image_advantages(*naive_leaves, beta) - log_q)
    z_minus = (w.sum(-1, keepdim=True) - w) / (k - 1)
    naive = k * torch.log1p(w.mean(-1)) - (k - 1) / k * torch.log1p(z_minus).sum(-1)
    weights = torch.linspace(0.5, 1.5, ours.shape[0], dtype=F64)  # a weighted sum: rows may not trade errors
    got = torch.autograd.grad((weights * ours).sum(), leaves)
    want = torch.autograd.grad((weights * naive).sum(), naive_leaves)
    for g_ours, g_naive in zip(got, want, strict=True):
        torch.testing.assert_close(g_ours, g_naive, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *x: plackett_luce_loss(*x, beta, log_q=log_q, estimator="jackknife"),
        tuple(t.clone().requires_grad_(True) for t in (pp, pn, rp, rn)),
    )


def test_jackknife_stays_finite_where_one_weight_dominates_or_none_counts():
    a = torch.tensor([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4], [3.0, 3.0, 3.0]])
    log_q = torch.full_like(a, -2.0)
    for dtype in (torch.float32, F64):
        leaf = a.to(dtype).requires_grad_(True)
        loss = _loss_of_advantages(leaf, log_q.to(dtype), "jackknife")
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), dtype
        # equal weights: every leave-one-out estimate is Z^ itself, so the correction vanishes
        torch.testing.assert_close(loss[2], _loss_of_advantages(leaf, log_q.to(dtype), "plugin")[2].detach())
        assert loss[1].abs() < 1e-6


def _exact_mean(a: torch.Tensor, q: torch.Tensor, k: int, estimator: str) -> float:
    """The expectation of an estimator over every ordered K-tuple of draws from q (no Monte-Carlo noise)."""
    index = torch.tensor(list(itertools.product(range(a.shape[0]), repeat=k)))
    return float((q[index].prod(-1) * _loss_of_advantages(a[index], q.log()[index], estimator)).sum())


POOLS = {  # (advantages mean, std, proposal): the estimator bench's regimes and proposals
    "mid, uniform": (-2.0, 1.5, "uniform"),
    "mid, learned": (-2.0, 1.5, "learned"),
    "early, learned": (-0.2, 0.5, "learned"),
    "heavy tail, uniform": (-2.0, 3.0, "uniform"),
}


def _pool(name: str, m: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A fixed pool's advantages ``[M]``, a proposal over it, and its full-pool loss ``log(1 + sum exp a)``."""
    mu, sigma, proposal = POOLS[name]
    g = torch.Generator().manual_seed(3)
    a = mu + sigma * torch.randn(m, generator=g, dtype=F64)
    if proposal == "uniform":
        q = torch.full((m,), 1.0 / m, dtype=F64)
    else:  # what q_phi reaches (bench/estimators.py): a noisy softmax of a / 2, floored
        q = 0.9 * torch.softmax(0.5 * a + torch.randn(m, generator=g, dtype=F64), -1) + 0.1 / m
    return a, q, float(F.softplus(torch.logsumexp(a, -1)))


@pytest.mark.parametrize("pool", list(POOLS))
def test_the_jackknife_mean_is_nearer_the_full_pool_loss_than_the_plugin(pool):
    """The bench's finding, exactly: over every draw of K = 3 from the pool, the plug-in's mean lies below the
    full-pool loss (Jensen) and the jackknife's lies at most half as far from it (0.04-0.42 of the plug-in's gap)."""
    a, q, full = _pool(pool)
    plugin, jackknife = (_exact_mean(a, q, 3, e) - full for e in ("plugin", "jackknife"))
    assert plugin < -0.03 * full
    assert abs(jackknife) < 0.5 * abs(plugin)


@pytest.mark.parametrize("pool", ["mid, learned", "heavy tail, uniform"])
def test_both_estimates_converge_to_the_full_pool_loss_as_k_grows(pool):
    a, q, full = _pool(pool)
    # exactly, K = 1..5: the plug-in's gap shrinks at every K; the jackknife's is smaller at each K >= 2 and shrinks too
    plugin = [abs(_exact_mean(a, q, k, "plugin") - full) for k in range(1, 6)]
    jackknife = [abs(_exact_mean(a, q, k, "jackknife") - full) for k in range(2, 6)]
    assert all(later < earlier for earlier, later in zip(plugin, plugin[1:], strict=False)), plugin
    assert all(j < p for j, p in zip(jackknife, plugin[1:], strict=True)), (jackknife, plugin)
    assert jackknife[-1] < jackknife[0] / 4, jackknife
    # by sampling, K = 8 against K = 128 (4000 draw sets each): both estimates' root-mean-square error to the
    # full-pool loss falls about as 1/sqrt(K) (a factor 4; asserted: at least 2.5), and at K = 128 their mean
    # lies within 1% of the loss (Monte-Carlo standard error there: about 0.1-0.3%)
    g = torch.Generator().manual_seed(0)
    for estimator in ("plugin", "jackknife"):
        rmse = []
        for k in (8, 128):
            index = torch.multinomial(q.expand(4000, -1), k, replacement=True, generator=g)
            loss = _loss_of_advantages(a[index], q.log()[index], estimator)
            rmse.append(float((loss - full).pow(2).mean().sqrt()))
        assert rmse[1] < rmse[0] / 2.5, (estimator, rmse)
        assert abs(float(loss.mean()) - full) < 0.01 * full, (estimator, float(loss.mean()), full)


def test_the_default_is_the_plugin_bit_for_bit():
    """The loss misp trained with before the estimator existed, transcribed: value and gradient identical."""
    pp, pn, rp, rn, log_q = _batch(b=5, k=3, seed=7, dtype=torch.float32)
    beta = 0.5

    def before(pp, pn, rp, rn, log_q):
        a = beta * ((pn - rn) - (pp - rp).unsqueeze(-1))
        x = a if log_q is None else a - log_q
        if log_q is not None:
            x = x - a.new_full(a.shape[:1], a.shape[1]).clamp_min(1).log().unsqueeze(-1)
        return torch.logsumexp(torch.cat([x.new_zeros(x.shape[0], 1), x], dim=-1), dim=-1)

    for lq in (log_q, None):
        results = []
        for loss_fn in (before, lambda *x: plackett_luce_loss(*x[:4], beta, log_q=x[4]),
                        lambda *x: plackett_luce_loss(*x[:4], beta, log_q=x[4], estimator="plugin")):
            leaves = [t.clone().requires_grad_(True) for t in (pp, pn, rp, rn)]
            loss = loss_fn(*leaves, lq)
            results.append((loss.detach(), torch.autograd.grad(loss.sum(), leaves)))
        for loss, grads in results[1:]:
            assert torch.equal(loss, results[0][0])
            assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0][1], strict=True))
    assert PlackettLuce().estimator == "plugin"
    for name in ("misp_dpo", "misp_ground", "mdpo", "random_neg"):
        assert Method.preset(name).terms["image"].estimator == "plugin", name


def test_the_loss_refuses_what_has_no_jackknife():
    pp, pn, rp, rn, log_q = _batch(k=3)
    with pytest.raises(ValueError, match="needs log_q"):
        plackett_luce_loss(pp, pn, rp, rn, 0.5, estimator="jackknife")
    with pytest.raises(ValueError, match="K >= 2 draws, got K=1"):
        plackett_luce_loss(pp, pn[:, :1], rp, rn[:, :1], 0.5, log_q=log_q[:, :1], estimator="jackknife")
    with pytest.raises(ValueError, match="unknown estimator 'snis'"):
        plackett_luce_loss(pp, pn, rp, rn, 0.5, log_q=log_q, estimator="snis")
    with pytest.raises(ValueError, match="estimator must be one of"):
        PlackettLuce(importance_sampling=True, estimator="snis")


def _with_image(name: str, image: PlackettLuce, k: int) -> Method:
    preset = Method.preset(name)
    return Method(preset.beta, {**preset.terms, "image": image}, Negatives(preset.negatives.source, k))


def test_the_method_check_refuses_the_jackknife_without_is_or_with_one_draw():
    with pytest.raises(MethodError) as info:
        _with_image("random_neg", PlackettLuce(estimator="jackknife"), 3)
    problems = str(info.value).splitlines()[1:]
    assert len(problems) == 1 and "terms.image" in problems[0], problems
    assert "needs importance_sampling: true" in problems[0]
    with pytest.raises(MethodError) as info:
        _with_image("misp_dpo", PlackettLuce(importance_sampling=True, estimator="jackknife"), 1)
    problems = str(info.value).splitlines()[1:]
    assert len(problems) == 1 and "needs negatives.k >= 2, got k=1" in problems[0], problems
    method = _with_image("misp_dpo", PlackettLuce(importance_sampling=True, estimator="jackknife"), 2)
    assert method.terms["image"].estimator == "jackknife" and method.negatives.k == 2


def _term_inputs(k: int = 3, seed: int = 1) -> TermInputs:
    pp, pn, rp, rn, log_q = _batch(k=k, seed=seed)
    policy = SequenceLogps(pp, pp - 1.0, pn.clone().requires_grad_(True))
    reference = SequenceLogps(rp, rp - 1.0, rn)
    a = image_advantages(policy.chosen, policy.negatives, reference.chosen, reference.negatives, 0.5)
    return TermInputs(policy, reference, 0.5, advantages=a, log_q=log_q)


def test_the_term_trains_the_jackknife_logs_its_correction_and_cools():
    x = _term_inputs()
    term = PlackettLuce(importance_sampling=True, estimator="jackknife")
    losses, metrics = term(x)
    p, r = x.policy, x.reference
    expected = plackett_luce_loss(p.chosen, p.negatives, r.chosen, r.negatives, 0.5, log_q=x.log_q, estimator="jackknife")
    plugin = plackett_luce_loss(p.chosen, p.negatives, r.chosen, r.negatives, 0.5, log_q=x.log_q)
    torch.testing.assert_close(losses, expected, rtol=0, atol=0)
    torch.testing.assert_close(metrics["is/jackknife_correction"], (expected - plugin).detach().mean())
    assert {"is/ess", "is/max_weight"} <= set(metrics)
    assert "is/jackknife_correction" not in PlackettLuce(importance_sampling=True)(x)[1]
    # Cooling with the jackknife: the same value; each negative's gradient scaled by its own cooling weight.
    cooling = Cooling(floor=-1.0, tau=0.5)
    cooled, cool_metrics = PlackettLuce(importance_sampling=True, estimator="jackknife", cooling=cooling)(x)
    torch.testing.assert_close(cooled, losses, rtol=0, atol=0)
    (g_plain,) = torch.autograd.grad(losses.sum(), p.negatives)
    (g_cooled,) = torch.autograd.grad(cooled.sum(), p.negatives)
    w = torch.sigmoid((x.advantages.detach() - cooling.floor) / cooling.tau)
    assert ((w > 0.05) & (w < 0.95)).any()  # the weights are not all 0 or 1 on this batch
    torch.testing.assert_close(g_cooled, w * g_plain, rtol=1e-12, atol=1e-14)
    assert "cool/weight_mean" in cool_metrics


@pytest.mark.parametrize(("method", "cooling"), [("misp_dpo", None), ("misp_ground", Cooling(floor=-2.0, tau=0.5))])
def test_the_jackknife_ablation_composes_with_its_methods(method, cooling, capsys, monkeypatch):
    """configs/experiments/ablations/jackknife.yaml on MISP-DPO and on misp_ground: the image term's estimator
    changes, its importance sampling and cooling and the method's other terms stay; with one draw it is refused."""
    monkeypatch.chdir(ROOT)
    args = ["fit", *method_configs(method, ROOT), "--config", "configs/experiments/ablations/jackknife.yaml"]
    with pytest.raises(SystemExit):
        main([*args, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    built = build_method(printed["model"]["init_args"]["method"])
    image = built.terms["image"]
    assert isinstance(image, PlackettLuce) and image.estimator == "jackknife"
    assert image.importance_sampling and image.cooling == cooling
    preset = Method.preset(method)
    assert list(built.terms) == list(preset.terms) and built.negatives == preset.negatives
    with pytest.raises(MethodError, match="needs negatives.k >= 2"):
        build_method({**printed["model"]["init_args"]["method"], "negatives": {"source": built.negatives.source, "k": 1}})
    experiment = yaml.safe_load((ROOT / "configs/experiments/shapes.yaml").read_text())
    ablation = {"misp_dpo": "misp_jackknife", "misp_ground": "ground_jackknife"}[method]
    assert {"name": ablation, "method": method, "like": method,
            "extra": ["configs/experiments/ablations/jackknife.yaml"]} in experiment["ablations"]


@pytest.mark.slow
def test_misp_dpo_with_the_jackknife_fits_and_logs_its_correction(tiny_world, clip_dir, sae_dir, vlm_dir, tmp_path,
                                                                   monkeypatch):
    import csv

    monkeypatch.chdir(tmp_path)
    main([
        "fit", *method_configs("misp_dpo", ROOT), "--config", str(ROOT / "configs/experiments/ablations/jackknife.yaml"),
        f"--model.init_args.vlm.path={vlm_dir}", f"--data.records_file={tiny_world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
        f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={tiny_world / 'val.jsonl'}",
        f"--data.pool={tiny_world / 'pool.jsonl'}", f"--data.clip.checkpoint={clip_dir}", f"--data.sae_path={sae_dir}",
        "--data.mining.n_candidates=8", "--data.mining.pool_size=4", "--data.mining.dup_threshold=0.99999",
        "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=4",
        "--data.progress=false",
    ])
    (metrics,) = (tmp_path / "runs").rglob("metrics.csv")
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 2
    for r in rows:
        assert all(math.isfinite(float(r[key])) for key in ("train/loss", "loss/image", "is/ess", "is/jackknife_correction"))
