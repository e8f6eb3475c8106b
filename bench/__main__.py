"""``python -m bench [NAMES...] [options]``: run the benchmarks (all, or the ones named) and print tables.

Each benchmark's tables and raw numbers, with the machine they were measured on, are written atomically
to ``bench/results/<name>.json``. ``python -m bench --help`` lists every size option.

Internal: ``python -m bench --child MODULE:FUNCTION CONFIG_JSON OUT_PATH`` is how a benchmark runs one
configuration in a fresh process (see ``bench.run_child``).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import RESULTS_DIR, allocator_measure, default_device, describe_machine, format_table, machine_info
from misp.utils.io import atomic_write_json

BENCHMARKS = (
    "mining", "logprobs", "forward", "trl_dpo", "negatives", "mining_scale", "demo_profile", "sft_cache", "estimators",
    "prefix_sharing", "padding_free",
)


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench --child")
    parser.add_argument("target")
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--child-threads", type=int, default=None)
    ns = parser.parse_args(argv)
    allocator_measure()  # before anything allocates: see bench.allocator_measure
    if ns.child_threads:
        torch.set_num_threads(ns.child_threads)
    module_name, _, function = ns.target.partition(":")
    fn = getattr(importlib.import_module(module_name), function)
    atomic_write_json(ns.out, fn(json.loads(ns.config)))


def _parser(modules: dict[str, Any]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="misp performance benchmarks: speed and memory, side by side with naive alternatives.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", default=list(BENCHMARKS),
                        help=f"benchmarks to run, from {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda; cuda when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; None: torch's choice")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the <name>.json results")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes (seconds per benchmark; the numbers mean nothing): trl_dpo, "
                             "negatives, mining_scale, demo_profile and sft_cache")
    for module in modules.values():
        module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1:])
        return
    modules = {name: importlib.import_module(f"bench.{name}") for name in BENCHMARKS}
    parser = _parser(modules)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)

    machine = machine_info(device)
    print(f"# misp benchmarks on {describe_machine(machine)}\n")
    load, threads = machine.get("load_average_1m"), torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and load is not None and load > machine["cores"] / 2:
        # OpenMP workers spin at barriers: with the cores already busy, a descheduled worker stalls every
        # parallel region, and small-op workloads (the forward benchmark) slow down up to tenfold.
        print(f"warning: load average {load} on {machine['cores']} cores; timings with {threads} threads are "
              "erratic on a busy machine, --threads 1 gives stable ones\n")
    for name in args.names:
        t0 = time.perf_counter()
        result = modules[name].run(args)
        wall = time.perf_counter() - t0
        for table in result["tables"]:
            print(f"## {name}: {table['title']}\n")
            print(format_table(table["rows"], table["columns"]))
            print()
        load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        print(f"({name}: {wall:.0f} s wall; load average {load} at the end)\n", flush=True)
        record = {
            "benchmark": name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine,
            "wall_s": round(wall, 1),
            "load_average_1m_end": load,
            "argv": argv,
            **result,
        }
        atomic_write_json(args.out / f"{name}.json", record)


if __name__ == "__main__":
    main()
