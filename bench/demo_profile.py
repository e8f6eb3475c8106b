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


def sft_step_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child: the SFT training step (loss, backward, AdamW) with the LM head on every position (as before
    ``response_logits``) and on the response positions only, interleaved; the losses must agree."""
    import random
    import statistics

    import torch

    from bench import allocator_steady
    from bench.forward import WORDS
    from misp.models.forward import response_logits, vlm_logits
    from misp.models.prompting import collate_examples, encode_example, preprocess_images
    from misp.testing.tiny_llava import TinyLlavaConfig, build_tiny_llava

    torch.manual_seed(0)
    model, processor = build_tiny_llava(WORDS, TinyLlavaConfig())  # the demo's sizes (configs/shapes/sft.yaml)
    model.train()
    rng = random.Random(0)
    vocab = [w for w in WORDS if w not in (".", "?", ",")]
    examples = [encode_example(processor, "describe the image .", " ".join(rng.choices(vocab, k=rng.randint(3, 16))) + " .")
                for _ in range(cfg["batch"])]
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    side = int((processor.image_processor.crop_size or {}).get("height", 64))
    from PIL import Image

    images = [Image.new("RGB", (side, side), (rng.randrange(256), 0, 0)) for _ in range(cfg["batch"])]
    pixels = preprocess_images(processor, images)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def loss_of(trim: bool) -> torch.Tensor:
        if trim:
            logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], pixels, batch["labels"])
        else:
            logits, labels = vlm_logits(model, batch["input_ids"], batch["attention_mask"], pixels), batch["labels"]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100)

    with torch.no_grad():
        full, trimmed = float(loss_of(False)), float(loss_of(True))
    if abs(full - trimmed) > 1e-5 * max(abs(full), 1.0):
        raise RuntimeError(f"response_logits changes the SFT loss: {full} vs {trimmed}")

    def step(trim: bool) -> None:
        loss_of(trim).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    allocator_steady()
    times: dict[str, list[float]] = {"all": [], "response": []}
    for _ in range(2):  # warm-up
        step(False), step(True)
    for rep in range(cfg["repeat"]):
        for name in ("all", "response") if rep % 2 == 0 else ("response", "all"):
            t0 = time.perf_counter()
            step(name == "response")
            times[name].append(time.perf_counter() - t0)
    ratios = [a / r for a, r in zip(times["all"], times["response"], strict=True)]
    return {"all_s": statistics.median(times["all"]), "response_s": statistics.median(times["response"]),
            "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)], "loss": full,
            "seq_len": int(batch["input_ids"].shape[1]), "times": times}


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
    from bench import run_child

    side = run_child("bench.demo_profile:sft_step_child", {"batch": 32, "repeat": 3 if args.quick else 15}, args.threads)
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
        "sft_step": side,
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
            {"title": f"The fix, side by side: one SFT step (loss, backward, AdamW) of the demo's tiny LLaVA, batch 32, "
                      f"{side['seq_len']} tokens, LM head on every position vs from the first response position "
                      f"(response_logits); median of {len(side['times']['all'])} interleaved steps",
             "columns": [("all_s", "all positions (s)"), ("response_s", "response positions (s)"),
                         ("ratio", "speed-up"), ("range", "range")],
             "rows": [{**side, "range": f"{side['ratio_range'][0]:.2f}-{side['ratio_range'][1]:.2f}"}]},
            {"title": "cProfile: cumulative time of selected functions",
             "columns": [("function", "function"), ("calls", "calls"), ("cum_s", "cumulative (s)"),
                         ("cum_pct", "% of profiled")],
             "rows": watch_rows},
        ],
    }
