"""Candidate retrieval in CLIP image space (method.md section 4.1).

For each positive image, the ``n`` pool images most cosine-similar to it, excluding the positive itself and
its near-duplicates. The pool is streamed in chunks with a running top-``n`` per query, so memory does not
grow with the pool size: a million-image pool costs the same working memory as a ten-thousand-image one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _similarity_block(queries: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[q, p]`` of one query chunk against one pool chunk (rows already unit-norm).

    Every similarity computed by :func:`retrieve_candidates` goes through here, one block at a time.
    """
    return queries @ pool.T


def retrieve_candidates(
    queries: torch.Tensor,
    pool: torch.Tensor,
    n: int = 64,
    exclude_index: torch.Tensor | None = None,
    dup_threshold: float = 0.98,
    query_chunk: int = 1024,
    pool_chunk: int = 65536,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` pool items most cosine-similar to each query, best first.

    Excluded for query ``r``: the pool item ``exclude_index[r]`` (the positive itself when it belongs to
    the pool) and every near-duplicate, i.e. any item with cosine ``> dup_threshold``. When fewer than
    ``n`` items remain, the tail is padded with index ``-1`` and similarity ``-inf``. Exact ties in
    similarity between distinct pool items may be resolved in either order.

    Memory: one query chunk against one pool chunk at a time, merged into a running top-``n``, so the
    working set is ``O(query_chunk * (pool_chunk + n))`` floats (plus one pool chunk of ``pool_chunk * d``)
    whatever the pool size ``P``. The ``[R, n]`` outputs are the only state that grows with ``R``.

    Args:
        queries: ``[R, d]`` query embeddings (the positives). Rows are L2-normalised here, chunk by chunk,
            so unnormalised inputs give true cosines.
        pool: ``[P, d]`` pool embeddings; may live on the CPU while the search runs on ``device``.
        n: candidates per query.
        exclude_index: ``[R]`` long, the pool index of each query's own image, ``-1`` when not in the pool.
        dup_threshold: pool items with cosine above this count as near-duplicates of the query.
        query_chunk: queries per block.
        pool_chunk: pool items per block.
        progress: show a tqdm bar over queries.
        device: where to compute; default the queries' device.

    Returns:
        ``(indices [R, n] long, sims [R, n] float32)`` on ``device``.
    """
    if queries.ndim != 2 or pool.ndim != 2:
        raise ValueError(
            f"expected queries [R, d] and pool [P, d], got {tuple(queries.shape)} and {tuple(pool.shape)}"
        )
    if queries.shape[1] != pool.shape[1]:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the pool has {pool.shape[1]}")
    if n < 1 or query_chunk < 1 or pool_chunk < 1:
        raise ValueError(
            f"n, query_chunk and pool_chunk must be positive, got {n}, {query_chunk}, {pool_chunk}"
        )
    R, P = queries.shape[0], pool.shape[0]
    device = torch.device(device) if device is not None else queries.device
    if exclude_index is not None:
        if exclude_index.shape != (R,):
            raise ValueError(f"exclude_index must have shape [{R}], got {tuple(exclude_index.shape)}")
        if exclude_index.numel() and (int(exclude_index.min()) < -1 or int(exclude_index.max()) >= P):
            raise ValueError(f"exclude_index entries must be in [-1, {P - 1}]")
        exclude_index = exclude_index.to(device=device, dtype=torch.long)

    out_idx = torch.full((R, n), -1, dtype=torch.long, device=device)
    out_sim = torch.full((R, n), float("-inf"), dtype=torch.float32, device=device)
    bar = tqdm(total=R, desc="retrieve candidates", unit="query", disable=not progress)
    for q0 in range(0, R, query_chunk):
        q = F.normalize(queries[q0 : q0 + query_chunk].to(device=device, dtype=torch.float32), dim=-1)
        best_sim = out_sim[q0 : q0 + q.shape[0]]
        best_idx = out_idx[q0 : q0 + q.shape[0]]
        excl = exclude_index[q0 : q0 + q.shape[0], None] if exclude_index is not None else None
        for p0 in range(0, P, pool_chunk):
            p = F.normalize(pool[p0 : p0 + pool_chunk].to(device=device, dtype=torch.float32), dim=-1)
            sim = _similarity_block(q, p)
            ids = torch.arange(p0, p0 + p.shape[0], device=device)
            drop = sim > dup_threshold
            if excl is not None:
                drop |= ids[None, :] == excl
            sim = sim.masked_fill(drop, float("-inf"))
            # Reduce the block to its own top-n before merging, so the merge is [q, 2n], not [q, n + p].
            blk_sim, blk_pos = sim.topk(min(n, p.shape[0]), dim=1)
            merged_sim = torch.cat([best_sim, blk_sim], dim=1)
            merged_idx = torch.cat([best_idx, blk_pos + p0], dim=1)
            best_sim, pos = merged_sim.topk(n, dim=1)
            best_idx = merged_idx.gather(1, pos)
        # A -inf similarity is an excluded item or padding: report it as index -1.
        out_sim[q0 : q0 + q.shape[0]] = best_sim
        out_idx[q0 : q0 + q.shape[0]] = best_idx.masked_fill(torch.isneginf(best_sim), -1)
        bar.update(q.shape[0])
    bar.close()
    return out_idx, out_sim
