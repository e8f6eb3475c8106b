"""Negative mining on synthetic CLIP embeddings: time and peak memory of each stage of the pipeline.

The stages are those of ``misp.negatives.mining`` and of the datamodule's per-epoch draws, called the way
``select_negatives`` and ``NegativeSamplerDataModule.draws_for_epoch`` call them, minus CLIP and the disk
caches:

1. ``retrieval``: ``retrieve_candidates`` (chunked top-N, the positive and its near-duplicates excluded).
2. ``differences + SAE``: ``Candidates.differences`` (``JointEmbedding.differences``, projected when
   ``d * d > proj_dim``) and ``sae_scores`` with a random-init ``SparseAutoencoder``, over record chunks.
3. ``selection``: ``select_chunk`` (greedy diverse selection and the proposal features), over the same chunks.
4. ``drawing``: one epoch of ``ProposalNet.log_probs`` and ``draw_from_lists`` (``draw_negatives``).

Synthetic data: L2-normalised Gaussian clusters (within-cluster cosine about 0.67), the records' positives
are the first R pool items, and for as many records as the pool allows a near-duplicate (cosine about
0.999) is planted in the pool; the run checks that retrieval returned neither.

A second table shows the retrieval working set at two pool chunk sizes and two pool sizes: at a fixed
chunk it must not grow with P (the pool itself is input and not counted).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench import PeakMemory, allocator_steady, mib, run_child, synchronize
from misp.batch import NegativeRef
from misp.negatives.mining import Candidates, select_chunk
from misp.negatives.projection import make_joint_embedding
from misp.negatives.proposal import ProposalNet
from misp.negatives.retrieval import retrieve_candidates
from misp.negatives.scoring import sae_scores
from misp.negatives.sources import draw_from_lists
from misp.sae.model import SAEConfig, SparseAutoencoder

NAME = "mining"

# The Shapes demo world (misp.world.config: n_pref 800, n_pool 1500; CLIP embed_dim 64) with the
# mining settings of configs/shapes/*.yaml (n_candidates 32, pool_size 8).
DEMO = {"records": 800, "pool": 1500, "dim": 64, "n": 32, "m": 8}

STAGES = ("retrieval", "score", "selection", "drawing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mining")
    g.add_argument("--records", type=int, default=2000, help="R: preference records")
    g.add_argument("--pool", type=int, default=100_000, help="P: pool images")
    g.add_argument("--dim", type=int, default=64,
                   help="CLIP embedding dimension d (64: outer product of 4096 dims, no projection; "
                        "768: projected to --proj-dim)")
    g.add_argument("--proj-dim", type=int, default=4096, help="joint embedding dimension when projecting")
    g.add_argument("--candidates", type=int, default=64, help="N: retrieved candidates per record")
    g.add_argument("--select", type=int, default=16, help="M: negatives selected per record")
    g.add_argument("--draws", type=int, default=3, help="K: negatives drawn per record per epoch")
    g.add_argument("--n-latents", type=int, default=128, help="SAE latents h")
    g.add_argument("--chunk-records", type=int, default=512, help="records scored and selected at once")
    g.add_argument("--query-chunk", type=int, default=1024, help="retrieval queries per block")
    g.add_argument("--pool-chunk", type=int, default=65536, help="retrieval pool items per block")
    g.add_argument("--sweep-pools", default="100000,200000",
                   help="comma-separated pool sizes of the retrieval-memory table")
    g.add_argument("--sweep-chunks", default="8192,65536",
                   help="comma-separated pool chunk sizes of the retrieval-memory table")
    g.add_argument("--no-demo", action="store_true", help="skip the demo-world configuration")


# ---------------------------------------------------------------------------------------------- data


def synthetic_embeddings(records: int, pool: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    """Unit-norm clustered pool ``[P, d]``, record images ``[R, d]`` and prompts ``[R, d]``.

    Record r's image is pool item r (``exclude_index[r] = r``) while r < P, a fresh sample otherwise
    (``-1``). ``duplicate_index[r]`` is the pool item planted as its near-duplicate, ``-1`` if none.
    """
    if records < 1 or pool < 1 or dim < 1:
        raise ValueError(f"records, pool and dim must be positive, got {records}, {pool}, {dim}")
    gen = torch.Generator().manual_seed(seed)
    n_clusters = max(1, pool // 100)
    centers = torch.randn(n_clusters, dim, generator=gen)

    def sample(n: int) -> torch.Tensor:
        assign = torch.randint(n_clusters, (n,), generator=gen)
        return F.normalize(centers[assign] + 0.7 * torch.randn(n, dim, generator=gen), dim=-1)

    pool_emb = sample(pool)
    in_pool = min(records, pool)
    image = torch.cat([pool_emb[:in_pool], sample(records - in_pool)])
    exclude = torch.full((records,), -1, dtype=torch.long)
    exclude[:in_pool] = torch.arange(in_pool)
    n_dup = min(in_pool, pool - in_pool)
    duplicate = torch.full((records,), -1, dtype=torch.long)
    if n_dup:
        noise = torch.randn(n_dup, dim, generator=gen) * (0.05 / math.sqrt(dim))
        pool_emb[in_pool : in_pool + n_dup] = F.normalize(image[:n_dup] + noise, dim=-1)
        duplicate[:n_dup] = torch.arange(in_pool, in_pool + n_dup)
    text = F.normalize(torch.randn(records, dim, generator=gen), dim=-1)
    return {"image": image, "text": text, "pool": pool_emb, "exclude": exclude, "duplicate": duplicate}


def _check_exclusions(indices: torch.Tensor, exclude: torch.Tensor, duplicate: torch.Tensor) -> None:
    idx = indices.cpu()
    own = (idx == exclude[:, None]) & (exclude[:, None] >= 0)
    dup = (idx == duplicate[:, None]) & (duplicate[:, None] >= 0)
    if bool(own.any()) or bool(dup.any()):
        raise RuntimeError(
            f"retrieval returned {int(own.sum())} positives and {int(dup.sum())} near-duplicates it must exclude"
        )


# ---------------------------------------------------------------------------------------------- children


def _setup(cfg: dict[str, Any]) -> torch.device:
    torch.manual_seed(cfg["seed"])
    return torch.device(cfg["device"])


def _retrieve(data: dict[str, torch.Tensor], cfg: dict[str, Any], device: torch.device, rows: slice):
    return retrieve_candidates(
        data["image"][rows], data["pool"], n=cfg["n"], exclude_index=data["exclude"][rows],
        dup_threshold=0.98, query_chunk=cfg["query_chunk"], pool_chunk=cfg["pool_chunk"], device=device,
    )


@torch.no_grad()
def _pipeline(data: dict[str, torch.Tensor], cfg: dict[str, Any], device: torch.device, sae, proposal,
              records: int, measure: bool) -> dict[str, Any]:
    """Every stage over the first ``records`` records; per-stage seconds, and peak bytes when ``measure``."""
    rows_all = slice(0, records)
    out: dict[str, Any] = {}

    with PeakMemory(device, enabled=measure) as mem:
        t0 = time.perf_counter()
        indices, sims = _retrieve(data, cfg, device, rows_all)
        synchronize(device)
        seconds = time.perf_counter() - t0
    out["retrieval"] = {"time_s": seconds, "peak_bytes": mem.peak_bytes}
    _check_exclusions(indices, data["exclude"][rows_all], data["duplicate"][rows_all])

    joint = make_joint_embedding(cfg["dim"], cfg["dim"], cfg["proj_dim"], seed=0)
    # As after mine_candidates: the cached candidates live on the CPU; select_negatives moves each chunk.
    cand = Candidates(data["image"][rows_all], data["text"][rows_all], data["pool"], indices.cpu(), sims.cpu(),
                      joint, key="bench")
    t_diff = t_sae = t_sel = 0.0
    peak_score = peak_sel = 0
    parts: dict[str, list[torch.Tensor]] = {"pool_index": [], "features": []}
    for start in range(0, records, cfg["chunk_records"]):
        rows = torch.arange(start, min(start + cfg["chunk_records"], records))
        with PeakMemory(device, enabled=measure) as mem:
            t0 = time.perf_counter()
            valid = cand.valid[rows].to(device)
            d = cand.differences(rows, device)
            synchronize(device)
            t1 = time.perf_counter()
            s = sae_scores(sae, d, valid)
            synchronize(device)
            t2 = time.perf_counter()
            del d
        t_diff, t_sae, peak_score = t_diff + t1 - t0, t_sae + t2 - t1, max(peak_score, mem.peak_bytes)
        with PeakMemory(device, enabled=measure) as mem:
            t0 = time.perf_counter()
            chunk = select_chunk(cand, rows, valid, s, cfg["m"], cfg["beta_div"])
            parts["pool_index"].append(chunk["pool_index"])
            parts["features"].append(chunk["features"])
            synchronize(device)
            t_sel += time.perf_counter() - t0
        peak_sel = max(peak_sel, mem.peak_bytes)
        del s
    out["score"] = {"time_s": t_diff + t_sae, "peak_bytes": peak_score, "differences_s": t_diff, "sae_s": t_sae}
    out["selection"] = {"time_s": t_sel, "peak_bytes": peak_sel}

    pool_index = torch.cat(parts["pool_index"])
    features = torch.cat(parts["features"])
    paths, ids = data["paths"], data["ids"][:records]
    with PeakMemory(device, enabled=measure) as mem:
        t0 = time.perf_counter()
        log_q = proposal.log_probs(features.to(device), (pool_index >= 0).to(device)).double().cpu()
        # As in NegativeSamplerDataModule.draws_for_epoch: pool indices to refs, then the seeded draws.
        lists = [[NegativeRef("sae", paths[i], i) if i >= 0 else None for i in row.tolist()] for row in pool_index]
        draws = draw_from_lists(log_q, lists, cfg["k"], seed=0, epoch=1, ids=ids)
        seconds = time.perf_counter() - t0
    out["drawing"] = {"time_s": seconds, "peak_bytes": mem.peak_bytes}
    if any(ref is None for row in draws.refs for ref in row):
        raise RuntimeError("drawing returned a padded (invalid) negative")
    out["valid_candidates"] = float((indices >= 0).float().mean())
    out["memory_method"] = mem.method
    return out


def stages_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child process: build the synthetic world, warm up on a few records, then a memory pass (allocator
    pinned) and a timing pass (allocator in its steady state) over every stage."""
    device = _setup(cfg)
    data: dict[str, Any] = synthetic_embeddings(cfg["records"], cfg["pool"], cfg["dim"], cfg["seed"])
    data["paths"] = [f"pool/{i:07d}.jpg" for i in range(cfg["pool"])]
    data["ids"] = [f"record-{i:07d}" for i in range(cfg["records"])]
    joint = make_joint_embedding(cfg["dim"], cfg["dim"], cfg["proj_dim"], seed=0)
    sae = SparseAutoencoder(SAEConfig(d_in=joint.dim, architecture="topk", n_latents=cfg["n_latents"]))
    sae = sae.to(device).eval()
    proposal = ProposalNet(num_features=4, eps=0.1).to(device)
    with torch.no_grad():
        proposal.w.normal_()  # a non-uniform q, as after some training
    _pipeline(data, cfg, device, sae, proposal, records=min(cfg["records"], 32), measure=False)  # warm-up
    memory = _pipeline(data, cfg, device, sae, proposal, records=cfg["records"], measure=True)
    allocator_steady()
    result = _pipeline(data, cfg, device, sae, proposal, records=cfg["records"], measure=False)
    for stage in STAGES:
        result[stage]["peak_bytes"] = memory[stage]["peak_bytes"]
        result[stage]["memory_pass_s"] = memory[stage]["time_s"]
    result["projected"] = joint.projected
    result["joint_dim"] = joint.dim
    return result


def retrieval_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child process: the peak memory of retrieval alone, for the working-set table."""
    device = _setup(cfg)
    data = synthetic_embeddings(cfg["records"], cfg["pool"], cfg["dim"], cfg["seed"])
    _retrieve(data, cfg, device, slice(0, min(cfg["records"], 8)))  # warm-up
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        indices, _ = _retrieve(data, cfg, device, slice(0, cfg["records"]))
        synchronize(device)
        seconds = time.perf_counter() - t0
    _check_exclusions(indices, data["exclude"], data["duplicate"])
    return {"memory_pass_s": seconds, "peak_bytes": mem.peak_bytes, "method": mem.method}


# ---------------------------------------------------------------------------------------------- driver


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from e
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


STAGE_NAMES = {
    "retrieval": "retrieval",
    "score": "differences + SAE scoring",
    "selection": "greedy selection + features",
    "drawing": "per-epoch drawing",
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the mining benchmark; returns the tables and raw results."""
    base = {
        "device": args.device, "seed": 0, "proj_dim": args.proj_dim,
        "k": args.draws, "n_latents": args.n_latents, "beta_div": 0.5, "chunk_records": args.chunk_records,
        "query_chunk": args.query_chunk, "pool_chunk": args.pool_chunk,
    }
    main = {"records": args.records, "pool": args.pool, "dim": args.dim, "n": args.candidates, "m": args.select}
    configs = [("main", {**base, **main})]
    if not args.no_demo:
        configs.append(("demo world", {**base, **DEMO}))

    stage_rows, raw = [], {}
    for label, cfg in configs:
        res = run_child("bench.mining:stages_child", cfg, args.threads)
        raw[label] = {"config": cfg, "result": res}
        shape = f"R={cfg['records']} P={cfg['pool']} d={cfg['dim']} N={cfg['n']} M={cfg['m']}"
        total_t = 0.0
        peak = 0
        for key in STAGES:
            title = STAGE_NAMES[key]
            st = res[key]
            note = ""
            if key == "score":
                proj = f"projected to {res['joint_dim']}" if res["projected"] else f"D={res['joint_dim']}"
                note = f"differences {st['differences_s']:.2f} s, SAE {st['sae_s']:.2f} s; {proj}"
            elif key == "retrieval":
                note = f"{100 * res['valid_candidates']:.0f}% slots filled"
            stage_rows.append({"config": f"{label}: {shape}", "stage": title, "time_s": st["time_s"],
                               "peak_mib": mib(st["peak_bytes"]), "note": note})
            total_t += st["time_s"]
            peak = max(peak, st["peak_bytes"])
        stage_rows.append({"config": f"{label}: {shape}", "stage": "total", "time_s": total_t,
                           "peak_mib": mib(peak), "note": "peak = largest stage"})

    sweep_rows = []
    pools, chunks = _ints(args.sweep_pools), _ints(args.sweep_chunks)
    sweep_records = min(args.records, args.query_chunk)
    for chunk in chunks:
        first = None
        for pool in pools:
            # One query chunk: the working set does not depend on R, only the run time does.
            cfg = {**base, **main, "records": sweep_records, "pool": pool, "pool_chunk": chunk}
            res = run_child("bench.mining:retrieval_child", cfg, args.threads)
            raw[f"retrieval chunk={chunk} P={pool}"] = {"config": cfg, "result": res}
            block = sweep_records * min(chunk, pool) * 4
            first = first if first is not None else res["peak_bytes"]
            sweep_rows.append({
                "pool_chunk": chunk, "pool": pool, "peak_mib": mib(res["peak_bytes"]),
                "block_mib": mib(block), "peak_per_block": round(res["peak_bytes"] / block, 2),
                "vs_first_pool": round(res["peak_bytes"] / max(first, 1), 2),
            })

    return {
        "config": {"main": configs[0][1], "demo": configs[1][1] if len(configs) > 1 else None,
                   "sweep_pools": pools, "sweep_chunks": chunks},
        "tables": [
            {"title": "Mining stages, one pass each (time: timing pass; peak: memory pass, on top of the inputs)",
             "columns": [("config", "config"), ("stage", "stage"), ("time_s", "time (s)"),
                         ("peak_mib", "peak (MiB)"), ("note", "note")],
             "rows": stage_rows},
            {"title": f"Retrieval working set (R={sweep_records}, d={args.dim}, query_chunk={args.query_chunk}; "
                      "block = one float32 query-chunk x pool-chunk similarity block; the pool itself is input)",
             "columns": [("pool_chunk", "pool_chunk"), ("pool", "P"), ("peak_mib", "peak (MiB)"), ("block_mib", "block (MiB)"),
                         ("peak_per_block", "peak / block"), ("vs_first_pool", f"peak / peak at P={pools[0]}")],
             "rows": sweep_rows},
        ],
        "raw": raw,
    }
