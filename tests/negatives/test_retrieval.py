from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import misp.negatives.retrieval as retrieval
from misp.negatives.retrieval import retrieve_candidates


def _brute_force(queries, pool, n, exclude_index, dup_threshold):
    """Full similarity matrix, explicit exclusion, a full sort per query, explicit padding."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(pool, dim=-1).T
    idx_out, sim_out = [], []
    for r in range(queries.shape[0]):
        keep = [
            (sims[r, j].item(), j)
            for j in range(pool.shape[0])
            if sims[r, j] <= dup_threshold and (exclude_index is None or j != exclude_index[r])
        ]
        keep.sort(key=lambda t: -t[0])
        keep = keep[:n] + [(float("-inf"), -1)] * max(0, n - len(keep))
        idx_out.append([j for _, j in keep])
        sim_out.append([s for s, _ in keep])
    return torch.tensor(idx_out), torch.tensor(sim_out)


def _world(R=11, P=200, d=16, seed=0):
    """Queries, a pool containing some queries themselves and some near-duplicates of others."""
    g = torch.Generator().manual_seed(seed)
    pool = F.normalize(torch.randn(P, d, generator=g), dim=-1)
    queries = F.normalize(torch.randn(R, d, generator=g), dim=-1)
    exclude = torch.full((R,), -1, dtype=torch.long)
    for r in range(0, R, 3):  # these queries are pool items
        exclude[r] = 5 * r + 1
        queries[r] = pool[5 * r + 1]
    for r in range(1, R, 3):  # these have a near-duplicate in the pool (cos > 0.98)
        pool[5 * r + 2] = F.normalize(queries[r] + 0.01 * torch.randn(d, generator=g), dim=0)
    return queries, pool, exclude


def test_matches_brute_force_with_exclusion_and_duplicates():
    queries, pool, exclude = _world()
    idx, sims = retrieve_candidates(queries, pool, n=10, exclude_index=exclude, dup_threshold=0.98)
    ref_idx, ref_sims = _brute_force(queries, pool, 10, exclude, 0.98)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(sims, ref_sims)
    for r in range(0, queries.shape[0], 3):
        assert exclude[r].item() not in idx[r].tolist()
    for r in range(1, queries.shape[0], 3):
        assert 5 * r + 2 not in idx[r].tolist()
    assert (sims[:, :-1] >= sims[:, 1:]).all()  # best first


def test_exclude_index_alone_removes_the_positive():
    # With dup_threshold above 1 only exclude_index can drop the positive (cosine 1 with itself).
    queries, pool, exclude = _world()
    idx, _ = retrieve_candidates(queries, pool, n=5, exclude_index=exclude, dup_threshold=1.5)
    ref_idx, _ = _brute_force(queries, pool, 5, exclude, 1.5)
    assert torch.equal(idx, ref_idx)
    no_excl, _ = retrieve_candidates(queries, pool, n=5, dup_threshold=1.5)
    assert no_excl[0, 0].item() == exclude[0].item()


def test_unnormalised_inputs_give_cosines():
    queries, pool, exclude = _world()
    scale_q = torch.linspace(0.5, 3.0, queries.shape[0])[:, None]
    scale_p = torch.linspace(0.2, 5.0, pool.shape[0])[:, None]
    a = retrieve_candidates(queries, pool, n=8, exclude_index=exclude)
    b = retrieve_candidates(queries * scale_q, pool * scale_p, n=8, exclude_index=exclude)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


@pytest.mark.parametrize("query_chunk,pool_chunk", [(1, 7), (4, 33), (5, 200), (1024, 65536), (3, 1)])
def test_chunk_sizes_do_not_change_results(query_chunk, pool_chunk):
    queries, pool, exclude = _world()
    ref = retrieve_candidates(queries, pool, n=12, exclude_index=exclude, query_chunk=1024, pool_chunk=65536)
    got = retrieve_candidates(
        queries, pool, n=12, exclude_index=exclude, query_chunk=query_chunk, pool_chunk=pool_chunk
    )
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])


def test_no_similarity_block_exceeds_the_chunk_bound(monkeypatch):
    queries, pool, exclude = _world(R=23, P=300)
    shapes = []
    real = retrieval._similarity_block

    def spy(q, p):
        shapes.append((q.shape[0], p.shape[0]))
        return real(q, p)

    monkeypatch.setattr(retrieval, "_similarity_block", spy)
    retrieve_candidates(queries, pool, n=10, exclude_index=exclude, query_chunk=6, pool_chunk=64)
    assert shapes, "similarities must go through _similarity_block"
    assert max(q for q, _ in shapes) <= 6 and max(p for _, p in shapes) <= 64
    # Every (query, pool item) pair is scored exactly once.
    assert sum(q * p for q, p in shapes) == 23 * 300


def test_tiny_pool_is_padded():
    pool = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    queries = pool[:1].clone()
    idx, sims = retrieve_candidates(queries, pool, n=5, exclude_index=torch.tensor([0]))
    assert idx.tolist() == [[1, 2, -1, -1, -1]]
    torch.testing.assert_close(sims[0, :2], torch.tensor([0.6, 0.0]))
    assert torch.isneginf(sims[0, 2:]).all()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="dimension"):
        retrieve_candidates(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="exclude_index"):
        retrieve_candidates(torch.ones(2, 3), torch.ones(4, 3), exclude_index=torch.tensor([0, 4]))
