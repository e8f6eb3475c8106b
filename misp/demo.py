"""``make demo``: the whole misp pipeline on the built-in Shapes world, on a CPU, end to end.

Each stage is the same ``misp`` command a user would type. A stage whose output already exists is
skipped, so an interrupted demo resumes where it stopped; ``--force`` reruns everything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORLD = Path("worlds/shapes")


@dataclass
class Stage:
    name: str
    args: list[str]
    done_when: Path


STAGES = [
    Stage("world", ["world", "--out", str(WORLD)], WORLD / "world.json"),
    Stage("clip", ["fit", "--config", "configs/shapes/clip.yaml"], Path("runs/shapes/clip/export")),
    Stage("sft", ["fit", "--config", "configs/shapes/sft.yaml"], Path("runs/shapes/sft/export")),
    Stage("sft-test", ["test", "--config", "configs/shapes/sft.yaml",
                       "--ckpt_path", "runs/shapes/sft/checkpoints/last.ckpt"], Path("runs/shapes/sft/test_results.json")),
]

SUMMARY = [("base (SFT)", Path("runs/shapes/sft/test_results.json"))]


def run_stage(stage: Stage, force: bool) -> None:
    if stage.done_when.exists() and not force:
        print(f"[demo] {stage.name}: done already ({stage.done_when}); skipping", flush=True)
        return
    cmd = [sys.executable, "-m", "misp.cli", *stage.args]
    print(f"[demo] {stage.name}: {' '.join(['misp', *stage.args])}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"[demo] {stage.name}: finished in {time.perf_counter() - start:.0f} s", flush=True)


def summary_table() -> str:
    rows = [(name, json.loads(path.read_text())) for name, path in SUMMARY if path.exists()]
    if not rows:
        return "(no results)"
    keys = sorted({k for _, r in rows for k in r})
    width = max(len(k) for k in keys)
    header = " " * width + "".join(f"{name:>14}" for name, _ in rows)
    lines = [header] + [k.ljust(width) + "".join(f"{r.get(k, float('nan')):>14.3f}" for _, r in rows) for k in keys]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    args = parser.parse_args()
    start = time.perf_counter()
    for stage in STAGES:
        run_stage(stage, args.force)
    print(f"\n[demo] all stages done in {time.perf_counter() - start:.0f} s\n")
    print(summary_table())


if __name__ == "__main__":
    main()
