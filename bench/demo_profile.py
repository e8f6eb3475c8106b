"""The demo's slowest stage under a profiler: where the SFT stage of ``make demo`` spends its time.

``make demo`` prints each stage's wall time (``[demo] <stage>: finished in N s``); its SFT stage (the tiny
LLaVA fine-tuned for 12 epochs on the Shapes captions and questions, ``configs/shapes/sft.yaml``) is the
slowest. Rerunning all of it under a profiler would take minutes, so this benchmark runs the stage's own
command, ``misp fit --config configs/shapes/sft.yaml``, bounded: one epoch of ``--profile-batches``
training batches, then one validation (the stage validates every 3 epochs) and the export, with

- Lightning's ``SimpleProfiler`` (``trainer.profiler``): wall time per loop action (fetching a batch,
  ``training_step``, backward, optimizer step, validation, ...);
- ``cProfile`` around the whole process: the functions with the most time of their own, and the
  cumulative time of the ones that matter for the reading (data collation, image preprocessing,
  the forward, generation).

It reads the demo's world and CLIP export (``worlds/shapes``, ``runs/shapes/clip/export``), running those two
stages first when they are missing (``misp world`` and ``misp fit --config configs/shapes/clip.yaml``, about
1.5 minutes), and writes nothing into ``runs/``: the config is copied with its output paths moved to a
temporary folder.
"""

from __future__ import annotations

import argparse
import pstats
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import child_env

NAME = "demo_profile"

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/shapes/sft.yaml"
# Functions whose cumulative time the table shows when cProfile saw them (name substrings: file:function).
WATCH = (
    ("sft_data.py", "_collate"), ("prompting.py", "preprocess_images"), ("prompting.py", "encode_example"),
    ("images.py", "load_rgb"), ("module.py", "_call_impl"), ("generation.py", "generate"),
    ("optimizer.py", "step"), ("__init__.py", "backward"), ("loop.py", "evaluate"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("demo_profile")
    g.add_argument("--profile-batches", type=int, default=60, help="training batches profiled (one epoch)")
    g.add_argument("--profile-top", type=int, default=12, help="functions listed by own time")


def _ensure_inputs() -> None:
    """The world and CLIP export the SFT stage reads, made by the demo's own commands when missing."""
    from misp.demo import pipeline, run_stage

    for stage in pipeline(all_methods=False):
        if stage.name in ("world", "clip") and not stage.done_when.exists():
            run_stage(stage, force=True)


def _config(tmp: Path) -> Path:
    """configs/shapes/sft.yaml with every ``runs/shapes/sft`` path under ``tmp`` and a SimpleProfiler."""
    text = (REPO / CONFIG).read_text().replace("runs/shapes/sft", str(tmp / "sft"))
    cfg = yaml.safe_load(text)
    cfg["trainer"]["profiler"] = {"class_path": "lightning.pytorch.profilers.SimpleProfiler",
                                  "init_args": {"dirpath": str(tmp), "filename": "simple"}}
    path = tmp / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


_ROW = re.compile(r"^\|\s*(?P<action>[^|]+?)\s*\|\s*(?P<mean>[-\d.e]+)\s*\|\s*(?P<calls>\d+)\s*\|\s*(?P<total>[-\d.e]+)\s*\|\s*(?P<pct>[-\d.e]+)")


def parse_simple_profiler(text: str) -> list[dict[str, Any]]:
    """Rows of a ``SimpleProfiler`` report: action, mean seconds, calls, total seconds, percentage."""
    rows = []
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m and m["action"] != "Action" and m["mean"] != "-":  # the Total row has no mean
            rows.append({"action": m["action"], "mean_s": float(m["mean"]), "calls": int(m["calls"]),
                         "total_s": float(m["total"]), "percent": float(m["pct"])})
    return rows


def _function_name(key: tuple[str, int, str]) -> str:
    file, line, name = key
    short = "/".join(Path(file).parts[-2:]) if file not in ("~", "") else "builtin"
    return f"{short}:{line}({name})" if line else name


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Profile one bounded SFT run; tables of Lightning actions and of functions by own time."""
    batches = 3 if args.quick else args.profile_batches
    if batches < 1:
        raise ValueError("--profile-batches must be positive")
    _ensure_inputs()
    with tempfile.TemporaryDirectory(prefix="misp-bench-profile-") as tmp_name:
        tmp = Path(tmp_name)
        config = _config(tmp)
        cmd = [sys.executable, "-m", "cProfile", "-o", str(tmp / "sft.prof"), "-m", "misp.cli", "fit",
               "--config", str(config), "--trainer.max_epochs=1", "--trainer.check_val_every_n_epoch=1",
               f"--trainer.limit_train_batches={batches}", "--trainer.enable_progress_bar=false"]
        if args.quick:
            cmd.append("--data.init_args.val_limit=2")
        env = child_env(args.threads)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"profiled SFT run failed (exit {proc.returncode}):\n{tail}")
        reports = sorted(tmp.glob("*simple*.txt"))
        actions = parse_simple_profiler(reports[-1].read_text()) if reports else []
        stats = pstats.Stats(str(tmp / "sft.prof"))
    total = sum(v[2] for v in stats.stats.values())  # own times add up to the profiled total
    by_own = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[: args.profile_top]
    function_rows = [{"function": _function_name(key), "calls": v[1], "own_s": v[2], "own_pct": 100 * v[2] / total,
                      "cum_s": v[3]} for key, v in by_own]
    watch_rows = []
    for file_part, name in WATCH:
        hits = [(k, v) for k, v in stats.stats.items() if k[2] == name and file_part in k[0]]
        if hits:
            key, v = max(hits, key=lambda kv: kv[1][3])
            watch_rows.append({"function": _function_name(key), "calls": v[1], "cum_s": v[3],
                               "cum_pct": 100 * v[3] / total})
    action_rows = [r for r in sorted(actions, key=lambda r: r["total_s"], reverse=True) if r["action"] != "Total"][:14]
    return {
        "config": {"batches": batches, "command": " ".join(cmd[5:])},
        "wall_s": wall,
        "tables": [
            {"title": f"SFT stage, bounded ({batches} training batches, one validation, export): Lightning "
                      f"SimpleProfiler actions by total time; whole run {wall:.0f} s wall (cProfile on)",
             "columns": [("action", "action"), ("calls", "calls"), ("mean_s", "mean (s)"), ("total_s", "total (s)"),
                         ("percent", "% of run")],
             "rows": action_rows},
            {"title": "cProfile: functions by own time",
             "columns": [("function", "function"), ("calls", "calls"), ("own_s", "own (s)"), ("own_pct", "own %"),
                         ("cum_s", "cumulative (s)")],
             "rows": function_rows},
            {"title": "cProfile: cumulative time of selected functions",
             "columns": [("function", "function"), ("calls", "calls"), ("cum_s", "cumulative (s)"),
                         ("cum_pct", "% of profiled")],
             "rows": watch_rows},
        ],
    }
