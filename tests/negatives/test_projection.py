from __future__ import annotations

import pytest
import torch

from misp.negatives.projection import _factor_pair, make_joint_embedding


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def _row_major_vec(x: torch.Tensor) -> torch.Tensor:
    # Explicit, element by element: index i * cols + j holds x[i, j].
    rows, cols = x.shape
    out = torch.empty(rows * cols, dtype=x.dtype)
    for i in range(rows):
        for j in range(cols):
            out[i * cols + j] = x[i, j]
    return out


def test_unprojected_equals_explicit_outer_product():
    je = make_joint_embedding(d_v=3, d_t=4, proj_dim=12)
    assert not je.projected and je.dim == 12
    h_v, h_t = _unit(5, 3, seed=1), _unit(5, 4, seed=2)
    e = je.embed(h_v, h_t)
    for k in range(5):
        ref = _row_major_vec(torch.outer(h_v[k], h_t[k]))
        torch.testing.assert_close(e[k], ref)
        assert e[k, 1 * 4 + 2] == h_v[k, 1] * h_t[k, 2]


def test_projection_equals_explicit_kronecker_projection():
    je = make_joint_embedding(d_v=6, d_t=5, proj_dim=12, seed=3)
    assert je.projected
    # d_v / d_t = 1.2: of the factor pairs of 12, 4 x 3 has the closest ratio.
    assert (je.A.shape, je.B.shape) == ((4, 6), (3, 5))
    h_v, h_t = _unit(7, 6, seed=4), _unit(7, 5, seed=5)
    e = je.embed(h_v, h_t)
    P = torch.kron(je.A.double(), je.B.double())  # [a*b, d_v*d_t]
    for k in range(7):
        ref = P @ _row_major_vec(torch.outer(h_v[k], h_t[k]))
        torch.testing.assert_close(e[k], ref)


def test_factor_pair_for_clip_sizes():
    assert _factor_pair(4096, 768, 768) == (64, 64)
    assert _factor_pair(4096, 1024, 256) == (128, 32)
    je = make_joint_embedding(768, 768)
    assert je.projected and je.dim == 4096
    assert make_joint_embedding(64, 64).projected is False  # 4096 <= 4096: exact outer product


def test_seeded_determinism_and_metadata():
    a, b, c = (make_joint_embedding(40, 30, proj_dim=64, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.equal(a.A, c.A)
    assert a.metadata() == b.metadata()
    assert a.metadata() != c.metadata()
    meta = a.metadata()
    assert meta["projected"] is True and meta["a"] * meta["b"] == 64 and meta["seed"] == 7
    plain = make_joint_embedding(4, 4, proj_dim=64).metadata()
    assert plain["projected"] is False and plain["dim"] == 16 and plain["a"] is None


def test_projection_preserves_norm_in_expectation():
    # A ~ N(0, 1/a), B ~ N(0, 1/b): E ||P e||^2 = ||e||^2 = 1 for unit h_v, h_t.
    je = make_joint_embedding(128, 96, proj_dim=1024, seed=0)
    e = je.embed(_unit(400, 128, seed=6).float(), _unit(400, 96, seed=7).float())
    assert abs(e.pow(2).sum(-1).mean().item() - 1.0) < 0.1


@pytest.mark.parametrize("dims", [(3, 4, 12), (6, 5, 12), (20, 16, 64)])
def test_differences_equal_difference_of_embeddings(dims):
    d_v, d_t, proj = dims
    je = make_joint_embedding(d_v, d_t, proj_dim=proj, seed=1)
    R, N = 3, 5
    h_pos, h_cand, h_t = _unit(R, d_v, seed=8), _unit(R, N, d_v, seed=9), _unit(R, d_t, seed=10)
    d = je.differences(h_pos, h_cand, h_t)
    assert d.shape == (R, N, je.dim)
    for r in range(R):
        ref = je.embed(h_pos[r : r + 1].expand(N, -1), h_t[r : r + 1].expand(N, -1)) - je.embed(
            h_cand[r], h_t[r : r + 1].expand(N, -1)
        )
        torch.testing.assert_close(d[r], ref)


def test_bad_shapes_raise():
    je = make_joint_embedding(6, 5, proj_dim=12)
    with pytest.raises(ValueError, match="last dimension"):
        je.embed(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="record counts"):
        je.differences(torch.zeros(2, 6), torch.zeros(3, 4, 6), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="positive integer"):
        make_joint_embedding(0, 5)
