"""Sparse autoencoder (method.md section 3): losses against hand computations, the topk training
constraints, dead-latent accounting and AuxK, training on synthetic sparse data, metrics, inspection."""

from __future__ import annotations

import math

import pytest
import torch

from misp.sae import SAEConfig, SAEOutput, SparseAutoencoder, describe_latents, sae_metrics, top_activating


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _set(model: SparseAutoencoder, W_enc, b_enc, W_dec, b_dec) -> None:
    with torch.no_grad():
        model.W_enc.copy_(torch.tensor(W_enc, dtype=torch.float32))
        model.b_enc.copy_(torch.tensor(b_enc, dtype=torch.float32))
        model.W_dec.copy_(torch.tensor(W_dec, dtype=torch.float32))
        model.b_dec.copy_(torch.tensor(b_dec, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------- config


def test_config_validates_and_resolves_aux_k():
    assert SAEConfig(d_in=4, n_latents=128, k=8).resolved_aux_k == 16
    assert SAEConfig(d_in=4, n_latents=10, k=8).resolved_aux_k == 10  # capped at n_latents
    assert SAEConfig(d_in=4, n_latents=64, k=2, aux_k=5).resolved_aux_k == 5
    with pytest.raises(ValueError, match="architecture"):
        SAEConfig(d_in=4, architecture="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must"):
        SAEConfig(d_in=4, n_latents=4, k=5)
    with pytest.raises(ValueError, match="rho"):
        SAEConfig(d_in=4, architecture="kl", rho=1.0)
    with pytest.raises(ValueError, match="d_in"):
        SAEConfig(d_in=0)


def test_bad_input_shape_is_a_clear_error():
    model = SparseAutoencoder(SAEConfig(d_in=3, n_latents=4, k=2))
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        model(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- kl


def test_kl_loss_matches_hand_computation():
    rho, gamma = 0.2, 0.5
    model = SparseAutoencoder(SAEConfig(d_in=2, architecture="kl", n_latents=2, rho=rho, gamma=gamma))
    W_enc, b_enc = [[1.0, 0.0], [0.0, -1.0]], [0.0, 0.5]
    W_dec, b_dec = [[1.0, 2.0], [0.0, 1.0]], [0.1, -0.1]
    _set(model, W_enc, b_enc, W_dec, b_dec)
    data = [[1.0, 2.0], [0.0, -1.0]]

    zs, sq_errs = [], []
    for d in data:
        z = [_sigmoid(sum(W_enc[j][i] * d[i] for i in range(2)) + b_enc[j]) for j in range(2)]
        recon = [sum(z[j] * W_dec[j][i] for j in range(2)) + b_dec[i] for i in range(2)]
        zs.append(z)
        sq_errs.append(sum((d[i] - recon[i]) ** 2 for i in range(2)))
    recon_loss = sum(sq_errs) / 2
    kl = 0.0
    for j in range(2):
        rho_hat = (zs[0][j] + zs[1][j]) / 2
        kl += rho * math.log(rho / rho_hat) + (1 - rho) * math.log((1 - rho) / (1 - rho_hat))

    out = model(torch.tensor(data))
    torch.testing.assert_close(out.latents, torch.tensor(zs), rtol=1e-5, atol=1e-6)  # float32 vs float64 hand
    assert out.losses["recon"].item() == pytest.approx(recon_loss, rel=1e-5)
    assert out.losses["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(recon_loss + gamma * kl, rel=1e-5)


def test_kl_penalty_is_finite_for_saturated_latents():
    model = SparseAutoencoder(SAEConfig(d_in=2, architecture="kl", n_latents=2))
    with torch.no_grad():
        model.b_enc.fill_(200.0)  # sigmoid == 1.0 exactly in float32
    out = model(torch.zeros(3, 2))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- topk

# A 3-latent, 3-dim topk model with unit decoder rows, used by the hand computations below.
_W_DEC = [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]]
_W_ENC = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
_B_ENC = [0.0, 0.0, -0.1]
_B_PRE = [0.5, 0.0, 0.0]
# Pre-activations: sample 1 [1.5, 1.0, 0.75], sample 2 [0.5, 2.0, 0.9], sample 3 [-1.5, -1.0, -1.35].
_DATA = [[2.0, 1.0, 0.2], [1.0, 2.0, 1.5], [-1.0, -1.0, -1.0]]


def _hand_topk(k: int):
    """Pre-activations, latents and reconstructions of _DATA, by explicit loops."""
    pres, zs, recons = [], [], []
    for d in _DATA:
        x = [d[i] - _B_PRE[i] for i in range(3)]
        pre = [sum(_W_ENC[j][i] * x[i] for i in range(3)) + _B_ENC[j] for j in range(3)]
        keep = sorted(range(3), key=lambda j: -pre[j])[:k]
        z = [max(pre[j], 0.0) if j in keep else 0.0 for j in range(3)]
        recon = [sum(z[j] * _W_DEC[j][i] for j in range(3)) + _B_PRE[i] for i in range(3)]
        pres.append(pre)
        zs.append(z)
        recons.append(recon)
    return pres, zs, recons


@pytest.mark.parametrize("k", [1, 2])
def test_topk_loss_matches_hand_computation(k):
    model = SparseAutoencoder(SAEConfig(d_in=3, n_latents=3, k=k, dead_after=1000))
    _set(model, _W_ENC, _B_ENC, _W_DEC, _B_PRE)
    _, zs, recons = _hand_topk(k)
    recon_loss = (
        sum(sum((d[i] - r[i]) ** 2 for i in range(3)) for d, r in zip(_DATA, recons, strict=True)) / 3
    )

    out = model(torch.tensor(_DATA))
    torch.testing.assert_close(out.latents, torch.tensor(zs), rtol=1e-5, atol=1e-6)  # float32 vs float64 hand
    torch.testing.assert_close(out.reconstruction, torch.tensor(recons), rtol=1e-5, atol=1e-6)
    assert out.latents[2].abs().sum() == 0  # all pre-activations negative: nothing fires, recon = b_pre
    assert out.losses["recon"].item() == pytest.approx(recon_loss, rel=1e-5)
    assert out.losses["auxk"].item() == 0.0  # no latent is dead yet
    assert out.loss.item() == pytest.approx(recon_loss, rel=1e-5)


def test_auxk_loss_matches_hand_computation():
    coef = 0.25
    model = SparseAutoencoder(SAEConfig(d_in=3, n_latents=3, k=1, aux_k=1, auxk_coef=coef, dead_after=10))
    _set(model, _W_ENC, _B_ENC, _W_DEC, _B_PRE)
    with torch.no_grad():
        model.samples_since_fired[2] = 10  # latent 2 (never top-1 on _DATA) is dead
    model.eval()  # eval: the counters are read, not updated
    pres, _, recons = _hand_topk(1)
    resid = [[d[i] - r[i] for i in range(3)] for d, r in zip(_DATA, recons, strict=True)]
    aux_recon = [[max(p[2], 0.0) * _W_DEC[2][i] for i in range(3)] for p in pres]
    num = sum(sum((e[i] - a[i]) ** 2 for i in range(3)) for e, a in zip(resid, aux_recon, strict=True))
    mean = [sum(e[i] for e in resid) / 3 for i in range(3)]
    den = sum(sum((e[i] - mean[i]) ** 2 for i in range(3)) for e in resid)
    recon_loss = sum(sum(x * x for x in e) for e in resid) / 3

    out = model(torch.tensor(_DATA))
    assert out.losses["auxk"].item() == pytest.approx(num / den, rel=1e-5)
    assert out.loss.item() == pytest.approx(recon_loss + coef * num / den, rel=1e-5)


def test_topk_keeps_exactly_k_largest_latents():
    torch.manual_seed(0)
    model = SparseAutoencoder(SAEConfig(d_in=16, n_latents=40, k=5))
    with torch.no_grad():
        model.b_enc.fill_(10.0)  # every pre-activation positive, so the ReLU removes none of the k
    d = torch.randn(32, 16)
    z = model.encode(d)
    assert ((z > 0).sum(dim=1) == 5).all()
    pre = model.pre_activations(d)
    expected = pre.sort(dim=1, descending=True).indices[:, :5].sort(dim=1).values
    assert torch.equal((z > 0).nonzero()[:, 1].view(32, 5), expected)
    assert torch.equal(z.gather(1, expected), pre.gather(1, expected))  # the kept values are copied, not recomputed


def test_decoder_stays_unit_norm_and_parallel_gradient_is_removed():
    torch.manual_seed(0)
    model = SparseAutoencoder(SAEConfig(d_in=8, n_latents=12, k=3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).loss.backward()
        before = model.W_dec.grad.clone()
        model.remove_parallel_grads_()
        after = model.W_dec.grad
        w = model.W_dec.detach()
        assert (after * w).sum(dim=1).abs().max() < 1e-6  # what remains is orthogonal to each row
        removed = before - after
        coef = (removed * w).sum(dim=1, keepdim=True)
        assert torch.allclose(removed, coef * w, atol=1e-6)  # what was removed is parallel to it
        opt.step()
        assert (model.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # the step alone does not keep the norm
        model.normalize_decoder_()
        assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(12), atol=1e-6)


def test_encoder_is_initialised_as_decoder_transpose():
    torch.manual_seed(0)
    model = SparseAutoencoder(SAEConfig(d_in=6, n_latents=10, k=2))
    assert torch.equal(model.W_enc, model.W_dec)
    assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(10), atol=1e-6)
    # As maps: the encoder R^6 -> R^10 is the transpose of the decoder R^10 -> R^6.
    enc_matrix = model.pre_activations(torch.eye(6)).T  # [10, 6], column i = encoder(e_i)
    dec_matrix = model.decode(torch.eye(10)).T  # [6, 10], column j = decoder(e_j)
    torch.testing.assert_close(enc_matrix, dec_matrix.T, rtol=1e-5, atol=1e-6)  # two matmuls: float32 tolerance


@pytest.mark.parametrize("architecture", ["topk", "kl"])
def test_init_from_data_sets_input_bias_to_mean(architecture):
    torch.manual_seed(0)
    model = SparseAutoencoder(SAEConfig(d_in=5, architecture=architecture, n_latents=8, k=2))
    sample = torch.randn(50, 5) + torch.arange(5.0)
    model.init_from_data(sample)
    torch.testing.assert_close(model.b_pre.detach(), sample.mean(dim=0), rtol=1e-5, atol=1e-6)
    assert model.b_pre is model.b_dec


# ---------------------------------------------------------------------------------------------- dead latents


def _dead_latent_model(dead_after: int) -> SparseAutoencoder:
    """Latents 0 and 1 win top-1 on positive inputs; latent 2 only on inputs along (-1, -1)."""
    model = SparseAutoencoder(SAEConfig(d_in=2, n_latents=3, k=1, dead_after=dead_after))
    s = 1 / math.sqrt(2)
    W = [[1.0, 0.0], [0.0, 1.0], [-s, -s]]
    _set(model, W, [0.0, 0.0, 0.0], W, [0.0, 0.0])
    return model


def test_latent_becomes_dead_exactly_after_dead_after_samples_and_revives():
    model = _dead_latent_model(dead_after=10)
    model.train()
    live = torch.tensor([[1.0, 0.2], [0.2, 1.0]] * 2 + [[1.0, 0.1]])  # 5 samples: latents 0 and 1 fire
    model(live)
    assert model.samples_since_fired.tolist() == [0, 0, 5]
    assert not model.dead_mask().any()
    model(live[:4])  # 9 samples without latent 2
    assert not model.dead_mask()[2]
    model(live[:1])  # 10 samples: dead now, exactly
    assert model.dead_mask().tolist() == [False, False, True]  # latent 1 sat out one sample only
    model.eval()
    model(live)  # evaluation passes do not count
    assert model.samples_since_fired.tolist() == [0, 1, 10]
    model.train()
    model(torch.tensor([[-1.0, -1.0], [0.0, 1.0]]))  # latent 2 fires: revived
    assert model.dead_mask().tolist() == [False, False, False]
    assert model.samples_since_fired.tolist() == [2, 0, 0]


def test_dead_counters_survive_a_state_dict_round_trip():
    model = _dead_latent_model(dead_after=3)
    model.train()
    model(torch.tensor([[1.0, 0.2], [1.0, 0.1], [1.0, 0.3]]))
    fresh = _dead_latent_model(dead_after=3)
    fresh.load_state_dict(model.state_dict())
    assert fresh.dead_mask().tolist() == [False, True, True]


def test_auxk_zero_without_dead_latents_and_its_gradient_reaches_dead_encoder_rows():
    model = _dead_latent_model(dead_after=100)
    model.train()
    d = torch.tensor([[1.0, -0.5], [-0.5, 1.0], [1.0, -0.8]])  # latent 2 has positive pre-activations
    assert (model.pre_activations(d)[:, 2] < 0).all()
    with torch.no_grad():
        model.b_enc[2] = 1.0  # now positive, yet never the top-1
    assert (model.pre_activations(d)[:, 2] > 0).all()
    out = model(d)
    assert out.losses["auxk"].item() == 0.0

    with torch.no_grad():
        model.samples_since_fired[2] = 100
    out = model(d)
    assert model.dead_mask().tolist() == [False, False, True]
    assert out.latents[:, 2].abs().sum() == 0
    assert out.losses["auxk"].item() > 0
    out.losses["recon"].backward(retain_graph=True)
    assert model.W_enc.grad[2].abs().sum() == 0  # the main loss never reaches a dead latent
    model.zero_grad()
    out.losses["auxk"].backward()
    assert model.W_enc.grad[2].abs().sum() > 0
    assert model.b_enc.grad[2] != 0
    assert model.W_dec.grad[2].abs().sum() > 0
    assert model.W_enc.grad[:2].abs().sum() == 0  # the live latents are untouched by AuxK


# ---------------------------------------------------------------------------------------------- training


def _sparse_data(n: int, d_in: int, n_dirs: int, active: int, seed: int) -> torch.Tensor:
    """Each sample is a positive combination of `active` of `n_dirs` random unit ground-truth directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d_in, generator=g), dim=1)
    idx = torch.rand(n, n_dirs, generator=g).argsort(dim=1)[:, :active]
    mask = torch.zeros(n, n_dirs).scatter_(1, idx, 1.0)
    return (mask * (0.5 + torch.rand(n, n_dirs, generator=g))) @ dirs


@pytest.mark.parametrize("architecture", ["topk", "kl"])
def test_training_on_sparse_synthetic_data_lowers_fvu(architecture):
    data = _sparse_data(2048, d_in=64, n_dirs=32, active=3, seed=0)
    torch.manual_seed(1234)  # a different stream from the data's, so no latent starts on a true direction
    model = SparseAutoencoder(
        SAEConfig(d_in=64, architecture=architecture, n_latents=64, k=4, dead_after=2000)
    )
    model.init_from_data(data)
    model.eval()
    fvu_start = sae_metrics(data, model(data), model)["fvu"]
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (256,))]
        opt.zero_grad()
        model(batch).loss.backward()
        if model.unit_norm_decoder:
            model.remove_parallel_grads_()
        opt.step()
        if model.unit_norm_decoder:
            model.normalize_decoder_()
    model.eval()
    metrics = sae_metrics(data, model(data), model)
    assert fvu_start > 0.5
    assert metrics["fvu"] < 0.1
    assert metrics["recon_cosine"] > 0.95
    if architecture == "topk":
        assert metrics["l0"] <= 4
        assert torch.allclose(model.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    else:
        assert metrics["mean_activation"] == pytest.approx(0.05, abs=0.02)  # the KL holds rho_hat near rho


# ---------------------------------------------------------------------------------------------- metrics


def test_sae_metrics_match_hand_values():
    model = SparseAutoencoder(SAEConfig(d_in=2, n_latents=3, k=2, dead_after=5))
    with torch.no_grad():
        model.samples_since_fired.copy_(torch.tensor([5, 0, 7]))
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = SAEOutput(
        reconstruction=torch.tensor([[2.0, 0.0], [0.0, 0.0]]),
        latents=torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]),
        loss=torch.tensor(0.0),
        losses={},
    )
    m = sae_metrics(d, out, model)
    # error 1 + 1 = 2; variance about the mean (0.5, 0.5): 4 * 0.25 = 1
    assert m["fvu"] == pytest.approx(2.0)
    assert m["l0"] == pytest.approx(1.0)
    assert m["dead_fraction"] == pytest.approx(2 / 3)
    assert m["recon_cosine"] == pytest.approx(0.5)  # cos 1 and cos 0 (zero reconstruction)
    assert "mean_activation" not in m

    kl_model = SparseAutoencoder(SAEConfig(d_in=2, architecture="kl", n_latents=3, rho=0.1, kl_fire_threshold=0.5))
    out.latents = torch.tensor([[0.9, 0.1, 0.6], [0.2, 0.7, 0.3]])
    m = sae_metrics(d, out, kl_model)
    assert m["l0"] == pytest.approx(1.5)  # latents above 0.5: two, then one
    assert m["mean_activation"] == pytest.approx(2.8 / 6)
    assert m["rho"] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------- inspection


def test_top_activating_matches_brute_force():
    torch.manual_seed(0)
    z = torch.rand(20, 4)
    idx, vals = top_activating(z, latent=2, k=5)
    order = sorted(range(20), key=lambda i: -z[i, 2].item())[:5]
    assert idx.tolist() == order
    assert torch.equal(vals, z[order, 2])
    assert len(top_activating(z, latent=0, k=50)[0]) == 20
    with pytest.raises(IndexError):
        top_activating(z, latent=4)


def test_describe_latents_agreement_and_ranking():
    labels = ["red->blue"] * 3 + ["circle->square"] * 3
    z = torch.zeros(6, 3)
    z[5, 0] = 3.0  # latent 0 fires on one pair only
    z[[0, 3, 4], 1] = torch.tensor([2.0, 1.5, 1.0])  # latent 1: one red->blue, two circle->square
    z[[0, 1, 2, 3], 2] = torch.tensor([1.0, 0.9, 0.8, 0.1])  # latent 2: top-3 all red->blue
    rows = describe_latents(z, labels, k=3)
    assert [r["latent"] for r in rows] == [2, 1, 0]
    r2, r1, r0 = rows
    assert r2["top_label"] == "red->blue" and r2["agreement"] == pytest.approx(1.0)
    assert r2["indices"] == [0, 1, 2] and r2["activations"] == pytest.approx([1.0, 0.9, 0.8])
    assert r1["top_label"] == "circle->square" and r1["agreement"] == pytest.approx(2 / 3)
    assert r1["labels"] == ["red->blue", "circle->square", "circle->square"]
    assert r0["labels"] == ["circle->square"] and r0["agreement"] == pytest.approx(1 / 3)
    assert [r["latent"] for r in describe_latents(z, labels, k=3, n_latents_to_show=2)] == [2, 1]
    with pytest.raises(ValueError, match="labels"):
        describe_latents(z, labels[:5])
