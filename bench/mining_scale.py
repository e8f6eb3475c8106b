"""Negative mining at scale: the embedding-free stages for pools of 10k, 100k and 1M at ViT-L width.

The same stages and child as the ``mining`` benchmark (``bench.mining.stages_child``: retrieval,
differences + SAE scoring, greedy selection + features, per-epoch drawing; CLIP and the disk caches left
out), on synthetic unit-norm embeddings of ViT-L/14's width (768), whose 768 x 768 joint embedding is
projected to 4096 as configs/llava.yaml does, for R records (default 2000) against pools of growing size.

How each stage grows: retrieval is a chunked R x P similarity search (time linear in R * P, working set
fixed by the chunk sizes); scoring, selection and drawing see only the R x N retrieved candidates (flat in
P). The second table scales the measured times to ``--scale-target-records`` records (default 100k, the
size of a public preference set such as RLHF-V's or mDPO's) linearly in R, since every stage is a loop
over record chunks: an extrapolation, labelled as such.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench import mib, run_child
from bench.mining import STAGE_NAMES, STAGES, _ints

NAME = "mining_scale"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mining_scale (also reads mining's --candidates, --select, --draws, "
                                  "--n-latents and chunk sizes)")
    g.add_argument("--scale-pools", default="10000,100000,1000000", help="pool sizes P")
    g.add_argument("--scale-records", type=int, default=1000, help="R: records mined (measured)")
    g.add_argument("--scale-dim", type=int, default=768, help="embedding width d (ViT-L/14: 768)")
    g.add_argument("--scale-target-records", type=int, default=100_000, help="R of the extrapolation table")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One ``stages_child`` per pool size; per-stage time, peak and growth, and the extrapolation to R."""
    pools, records, dim = _ints(args.scale_pools), args.scale_records, args.scale_dim
    if args.quick:
        pools, records = [1000, 4000], 64
    if records < 1 or dim < 1:
        raise ValueError("--scale-records and --scale-dim must be positive")
    base = {"device": args.device, "seed": 0, "records": records, "dim": dim, "proj_dim": args.proj_dim,
            "n": args.candidates, "m": args.select, "k": args.draws, "n_latents": args.n_latents, "beta_div": 0.5,
            "chunk_records": args.chunk_records, "query_chunk": args.query_chunk, "pool_chunk": args.pool_chunk}
    results: dict[int, dict[str, Any]] = {}
    rows = []
    for pool in pools:
        res = run_child("bench.mining:stages_child", {**base, "pool": pool}, args.threads)
        results[pool] = res
        first = results[pools[0]]
        for key in [*STAGES, "total"]:
            t = sum(res[s]["time_s"] for s in STAGES) if key == "total" else res[key]["time_s"]
            t0 = sum(first[s]["time_s"] for s in STAGES) if key == "total" else first[key]["time_s"]
            peak = max(res[s]["peak_bytes"] for s in STAGES) if key == "total" else res[key]["peak_bytes"]
            rows.append({"pool": pool, "stage": STAGE_NAMES.get(key, key), "time_s": t, "time_growth": t / max(t0, 1e-9),
                         "peak_mib": mib(peak), "pool_mib": mib(pool * dim * 4)})
    scale = args.scale_target_records / records
    largest = results[pools[-1]]
    extrapolated = []
    for key in [*STAGES, "total"]:
        t = sum(largest[s]["time_s"] for s in STAGES) if key == "total" else largest[key]["time_s"]
        extrapolated.append({"stage": STAGE_NAMES.get(key, key), "measured_s": t, "target_s": t * scale,
                             "target_min": t * scale / 60})
    shape = (f"R={records}, d={dim} projected to {largest['joint_dim']}" if largest["projected"]
             else f"R={records}, d={dim} (D={largest['joint_dim']})")
    return {
        "config": base | {"pools": pools, "target_records": args.scale_target_records},
        "tables": [
            {"title": f"Mining stages by pool size: {shape}, N={args.candidates}, M={args.select}, K={args.draws}; "
                      f"time: timing pass; peak: memory pass, on top of the inputs (the pool, shown alone); "
                      f"growth: time / time at P={pools[0]}",
             "columns": [("pool", "P"), ("stage", "stage"), ("time_s", "time (s)"), ("time_growth", "time growth"),
                         ("peak_mib", "peak (MiB)"), ("pool_mib", "pool embeddings (MiB)")],
             "rows": rows},
            {"title": f"EXTRAPOLATED, not measured: P={pools[-1]} for R={args.scale_target_records} records, "
                      f"the measured R={records} times scaled linearly in R (x{scale:.0f}); peaks do not grow with R "
                      "(record chunks) beyond the R x N candidate indices",
             "columns": [("stage", "stage"), ("measured_s", f"measured at R={records} (s)"),
                         ("target_s", f"R={args.scale_target_records} (s)"), ("target_min", "(min)")],
             "rows": extrapolated},
        ],
        "raw": {str(p): r for p, r in results.items()},
    }
