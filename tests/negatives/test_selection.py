from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from misp.negatives.scoring import sae_scores
from misp.negatives.selection import greedy_diverse_select, selection_features


class LinearSAE(nn.Module):
    """Stand-in for misp.sae.model.SparseAutoencoder: a fixed ReLU encoder and linear decoder."""

    def __init__(self, D: int, h: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.enc = nn.Parameter(torch.randn(h, D, generator=g) / math.sqrt(D))
        self.dec = nn.Parameter(torch.randn(D, h, generator=g) / math.sqrt(h))
        self.calls = 0
        self.modes: list[bool] = []

    def encode(self, d: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.append(self.training)
        return torch.relu(d @ self.enc.T)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.dec.T


# ---------------------------------------------------------------- scoring


def test_sae_scores_match_formulas_over_valid_candidates():
    torch.manual_seed(0)
    R, N, D, h = 4, 6, 10, 7
    sae = LinearSAE(D, h)
    d = torch.randn(R, N, D)
    valid = torch.rand(R, N) > 0.3
    valid[:, 0] = True
    d[~valid] = 1e3  # garbage in padded slots must not leak into any max
    out = sae_scores(sae, d, valid, batch_size=5)
    with torch.no_grad():
        for r in range(R):
            ls = {}
            vs = {}
            for i in range(N):
                if valid[r, i]:
                    z = torch.relu(sae.enc @ d[r, i])
                    ls[i] = (d[r, i] - sae.dec @ z).pow(2).sum().item()
                    vs[i] = z.abs().sum().item()
                    torch.testing.assert_close(out["z"][r, i], z)
            lmax, vmax = max(ls.values()), max(vs.values())
            for i in range(N):
                if valid[r, i]:
                    assert out["l"][r, i].item() == pytest.approx(ls[i], rel=1e-5)
                    assert out["v"][r, i].item() == pytest.approx(vs[i], rel=1e-5)
                    assert out["s"][r, i].item() == pytest.approx(ls[i] / lmax + vs[i] / vmax, rel=1e-5)
                else:
                    assert out["l"][r, i] == 0 and out["v"][r, i] == 0 and torch.isneginf(out["s"][r, i])
                    assert (out["z"][r, i] == 0).all()
    assert out["z"].requires_grad is False and out["s"].requires_grad is False


def test_sae_scores_batching_eval_mode_and_zero_max_guard():
    torch.manual_seed(1)
    R, N, D, h = 3, 5, 8, 6
    sae = LinearSAE(D, h)
    sae.train()
    d = torch.randn(R, N, D)
    d[1] = 0.0  # all-zero differences: l = v = 0 for the whole record
    valid = torch.ones(R, N, dtype=torch.bool)
    a = sae_scores(sae, d, valid, batch_size=2)
    assert sae.calls == math.ceil(R * N / 2) and not any(sae.modes)
    assert sae.training  # the training flag is restored
    b = sae_scores(sae, d, valid, batch_size=8192)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert torch.equal(a["s"][1], torch.zeros(N))  # guarded: no NaN from 0 / 0
    assert torch.isfinite(a["s"]).all()
    # Per record, the best candidate on each criterion contributes exactly 1.
    assert torch.allclose((a["l"] / a["l"].amax(1, keepdim=True))[[0, 2]].amax(1), torch.ones(2))


def test_sae_scores_with_no_valid_candidate():
    sae = LinearSAE(4, 3)
    out = sae_scores(sae, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert out["z"].shape == (2, 3, 3) and torch.isneginf(out["s"]).all()


# ---------------------------------------------------------------- selection


def _reference_select(scores, latents, valid, m, beta_div):
    """Plain Python greedy selection, one record at a time, in float64."""
    R, N = scores.shape
    idx_out, gain_out = [], []
    for r in range(R):
        z = latents[r].double()
        chosen, gains = [], []
        for _ in range(m):
            best, best_i, best_gain = -math.inf, -1, 0.0
            for i in range(N):
                if not valid[r, i] or i in chosen:
                    continue
                if chosen:
                    gain = min(
                        1.0 - torch.nn.functional.cosine_similarity(z[i], z[j], dim=0, eps=1e-12).item()
                        for j in chosen
                    )
                    obj = scores[r, i].item() + beta_div * gain
                else:
                    gain, obj = 1.0, scores[r, i].item()
                if obj > best:
                    best, best_i, best_gain = obj, i, gain
            if best_i < 0:
                break
            chosen.append(best_i)
            gains.append(best_gain)
        idx_out.append(chosen + [-1] * (m - len(chosen)))
        gain_out.append(gains + [0.0] * (m - len(gains)))
    return torch.tensor(idx_out), torch.tensor(gain_out, dtype=torch.float32)


def _random_case(R, N, h, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(R, N, generator=g) * 2
    latents = torch.relu(torch.randn(R, N, h, generator=g))
    valid = torch.rand(R, N, generator=g) > 0.25
    return scores, latents, valid


@pytest.mark.parametrize(
    "R,N,m,beta_div,seed",
    [(1, 5, 3, 0.5, 0), (4, 8, 3, 0.5, 1), (6, 10, 10, 1.0, 2), (3, 12, 5, 2.0, 3), (5, 6, 9, 0.3, 4)],
)
def test_greedy_matches_python_reference(R, N, m, beta_div, seed):
    scores, latents, valid = _random_case(R, N, h=6, seed=seed)
    idx, gains = greedy_diverse_select(scores, latents, valid, m=m, beta_div=beta_div)
    ref_idx, ref_gains = _reference_select(scores, latents, valid, m, beta_div)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gains, ref_gains, atol=1e-5, rtol=1e-5)


def test_beta_zero_is_top_m_by_score_and_padding():
    scores, latents, valid = _random_case(7, 9, h=4, seed=5)
    valid[2] = False
    valid[2, 3] = True  # one valid candidate: one pick, then padding
    idx, gains = greedy_diverse_select(scores, latents, valid, m=4, beta_div=0.0)
    masked = scores.masked_fill(~valid, -math.inf)
    for r in range(7):
        k = min(4, int(valid[r].sum()))
        assert idx[r, :k].tolist() == masked[r].topk(k).indices.tolist()
        assert (idx[r, k:] == -1).all() and (gains[r, k:] == 0).all()
    assert idx[2].tolist() == [3, -1, -1, -1]
    assert (gains[:, 0] == 1.0).all()


def test_no_index_chosen_twice_and_only_valid_ones():
    scores, latents, valid = _random_case(50, 16, h=8, seed=6)
    latents[:, 1] = latents[:, 0]  # identical codes: diversity term 0 between them
    idx, _ = greedy_diverse_select(scores, latents, valid, m=16, beta_div=5.0)
    for r in range(50):
        picked = [i for i in idx[r].tolist() if i >= 0]
        assert len(picked) == len(set(picked)) == int(valid[r].sum())
        assert all(valid[r, i] for i in picked)


def test_diversity_term_changes_the_choice():
    # Candidate 1 scores just below 0 but duplicates its code; candidate 2 is orthogonal.
    scores = torch.tensor([[1.0, 0.9, 0.8]])
    latents = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    idx, gains = greedy_diverse_select(scores, latents, valid, m=2, beta_div=0.5)
    assert idx.tolist() == [[0, 2]] and gains[0, 1].item() == pytest.approx(1.0)
    idx0, gains0 = greedy_diverse_select(scores, latents, valid, m=2, beta_div=0.0)
    assert idx0.tolist() == [[0, 1]] and gains0[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_speed_sanity_large_batch():
    scores, latents, valid = _random_case(2000, 64, h=128, seed=7)
    idx, gains = greedy_diverse_select(scores, latents, valid, m=16)
    assert idx.shape == (2000, 16) and gains.shape == (2000, 16)


# ---------------------------------------------------------------- features


def test_selection_features_gather_the_selected_items():
    scores, latents, valid = _random_case(3, 7, h=5, seed=8)
    valid[1] = False
    valid[1, :2] = True
    recon = torch.rand(3, 7) * 3
    v = torch.rand(3, 7) * 5
    clip_cos = torch.rand(3, 7)
    idx, gains = greedy_diverse_select(scores, latents, valid, m=4)
    f = selection_features(recon, v, gains, clip_cos, idx, valid)
    assert f.shape == (3, 4, 4)
    for r in range(3):
        lmax = recon[r][valid[r]].max()
        vmax = v[r][valid[r]].max()
        for k in range(4):
            i = idx[r, k].item()
            if i < 0:
                assert (f[r, k] == 0).all()
                continue
            expected = torch.tensor([recon[r, i] / lmax, v[r, i] / vmax, gains[r, k], clip_cos[r, i]])
            torch.testing.assert_close(f[r, k], expected)
    assert (idx[1, 2:] == -1).all()
