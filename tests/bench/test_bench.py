"""Smoke tests of the benchmarks added for issue 14 (trl_dpo, negatives, mining_scale, demo_profile, sft_cache).

Each runs a benchmark child at the smallest sizes in a fresh process (as ``python -m bench`` does, so the
allocator settings stay out of the test process) and checks what it reports, never how fast it was.
"""

from __future__ import annotations

import argparse

import pytest

from bench import run_child
from bench.__main__ import _parser
from bench.demo_profile import _config, parse_simple_profiler


@pytest.mark.parametrize("model", ["tiny", "qwen25vl"])
def test_trl_dpo_child_matches_trl_and_reports_every_contender(model):
    # qwen25vl: the real Qwen2.5-VL architecture, two image sizes in the batch (dynamic resolution, M-RoPE).
    pytest.importorskip("trl")
    cfg = {"device": "cpu", "seed": 0, "batch": 2, "steps": 1, "repeats": 1, "words": 6, "model": model,
           "contenders": ["misp-cold", "misp-warm", "trl"]}
    res = run_child("bench.trl_dpo:time_child", cfg, threads=1)
    # The same tokens (checked in the child) and the same reference log-probs up to float32 rounding.
    assert res["logps_max_abs_diff"] < 1e-3 * max(res["logps_scale"], 1.0)
    assert set(res["samples_per_s"]) == set(cfg["contenders"])
    assert all(len(v) == 1 and v[0] > 0 for v in res["samples_per_s"].values())


def test_trl_dpo_memory_child_of_misp_runs_without_trl():
    cfg = {"device": "cpu", "seed": 0, "batch": 2, "steps": 1, "repeats": 1, "words": 6, "model": "tiny",
           "contender": "misp-warm"}
    res = run_child("bench.trl_dpo:memory_child", cfg, threads=1)
    assert res["peak_bytes"] >= 0 and res["max_rss_bytes"] > 0 and res["method"]


def test_negatives_child_covers_every_variant_k_and_m():
    variants = ["once+warm", "per-row+cold"]
    cfg = {"device": "cpu", "seed": 0, "model": "tiny", "batch": 2, "ks": [0, 1], "m": 4, "ms": [4, 8],
           "repeat": 1, "variants": variants}
    res = run_child("bench.negatives:negatives_child", cfg, threads=1)
    assert set(res["configs"]) == {f"{v},{k},{m}" for v in variants for k, m in [(0, 4), (1, 4), (3, 4), (3, 8)]}
    k1 = res["configs"]["once+warm,1,4"]
    assert k1["rows"] == 2 * 2 + 2 * 1 and k1["images"] == 2 + 2 * 1
    assert all(c["median_s"] > 0 and c["peak_bytes"] >= 0 for c in res["configs"].values())


def test_mining_scale_quick_reports_growth_and_extrapolation(tmp_path):
    from bench import mining_scale

    args = _parser({"mining": __import__("bench.mining", fromlist=["x"]), "mining_scale": mining_scale}).parse_args(
        ["mining_scale", "--threads", "1", "--scale-pools", "500,1000", "--scale-records", "16", "--scale-dim", "32",
         "--candidates", "8", "--select", "4", "--chunk-records", "8", "--n-latents", "16"])
    result = mining_scale.run(args)
    stages, extrapolated = result["tables"]
    assert [r["pool"] for r in stages["rows"]].count(1000) == 5  # four stages and the total
    assert extrapolated["rows"][-1]["target_s"] == pytest.approx(extrapolated["rows"][-1]["measured_s"] * 100_000 / 16)


def test_simple_profiler_report_is_parsed():
    report = """
FIT Profiler Report

| Action | Mean duration (s) | Num calls | Total time (s) | Percentage % |
|--------------------------------|------------------|-------------|---------------|----------------|
| Total                          | -                | 120         | 12.5          | 100 %          |
| run_training_epoch             | 8.1              | 1           | 8.1           | 64.8           |
| [Strategy]SingleDeviceStrategy.training_step | 0.05 | 60 | 3.0 | 24.0 |
"""
    rows = parse_simple_profiler(report)
    assert [r["action"] for r in rows] == ["run_training_epoch", "[Strategy]SingleDeviceStrategy.training_step"]
    assert rows[1]["calls"] == 60 and rows[1]["total_s"] == 3.0


def test_profiled_config_writes_nothing_into_runs(tmp_path):
    text = _config(tmp_path).read_text()
    assert "runs/shapes/sft" not in text and str(tmp_path / "sft") in text and "SimpleProfiler" in text


def test_quick_flag_is_accepted():
    from bench.__main__ import BENCHMARKS

    modules = {name: __import__(f"bench.{name}", fromlist=["x"]) for name in BENCHMARKS}
    args = _parser(modules).parse_args(["trl_dpo", "--quick"])
    assert isinstance(args, argparse.Namespace) and args.quick


def test_sft_cache_quick_compares_every_variant_on_a_world(tiny_world):
    from bench import sft_cache

    args = _parser({"sft_cache": sft_cache}).parse_args(
        ["sft_cache", "--quick", "--threads", "1", "--sft-world", str(tiny_world)])
    result = sft_cache.run(args)
    (table,) = result["tables"]
    assert len(table["rows"]) == 4
    assert all(r["before_s"] > 0 and r["after_s"] > 0 and r["ratio"] > 0 for r in table["rows"])
    res = result["result"]
    assert res["batches_per_pass"] == 3 and 0 < res["cold_hit_rate"] < 1 and res["cache_mib"] > 0
    with pytest.raises(FileNotFoundError, match="no sft.jsonl"):
        sft_cache.run(_parser({"sft_cache": sft_cache}).parse_args(["sft_cache", "--sft-world", "/nonexistent"]))
