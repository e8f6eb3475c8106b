"""The SFT stage's two wastes found by ``demo_profile``, before and after their fixes, side by side.

docs/performance.md section 4 profiled the demo's slowest stage (``misp fit --config configs/shapes/sft.yaml``)
and found, besides the training compute, (a) every epoch decoding the same PNGs and running the CLIP image
processor on them again, and (b) ``encode_example`` tokenising every example's prompt on its own, though
the 10 034 Shapes SFT examples share 16 prompts. The fixes are ``misp.data.pixel_cache`` (the SFT
datamodule's ``image_cache_mb``) and the per-tokenizer prompt cache of ``misp.models.prompting``. One child
process, on the real Shapes SFT data and the demo's tiny LLaVA (``TinyLlavaConfig()``), times, alternating
the variants in every repeat:

- batch fetching: one pass of the SFT ``train_dataloader`` (shuffled, batch 32, ``num_workers=0`` as in the
  demo) with the pixel cache off (as before), cold (emptied first: the first epoch, in which an image
  already recurs about 3 times) and warm (every later epoch);
- the training step loop: ``--cache-step-batches`` batches of fetching, forward with the loss, backward and
  AdamW, cache off vs warm;
- setup's tokenisation: ``encode_records`` over every SFT record, as ``SFTDataModule.setup`` runs it, with
  the prompt cache off (as before) vs on (emptied first, as in a fresh process); the encodings must be equal.

The world is ``--sft-world`` (default ``worlds/shapes``, made with the demo's ``misp world`` stage when missing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

NAME = "sft_cache"

REPO = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sft_cache")
    g.add_argument("--sft-world", default=None, help="Shapes world folder; default: the demo's worlds/shapes")
    g.add_argument("--cache-repeat", type=int, default=3, help="alternating repeats of each comparison")
    g.add_argument("--cache-fetch-batches", type=int, default=0,
                   help="batches per fetching pass (0: the whole epoch)")
    g.add_argument("--cache-step-batches", type=int, default=20, help="batches of the timed training step loop")


def _summary(before: list[float], after: list[float]) -> dict[str, Any]:
    """Medians of two alternated series and the median and range of their per-repeat ratios before/after."""
    ratios = [b / a for b, a in zip(before, after, strict=True)]
    return {"before_s": statistics.median(before), "after_s": statistics.median(after),
            "ratio": statistics.median(ratios), "range": f"{min(ratios):.2f}-{max(ratios):.2f}"}


def sft_cache_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child: fetching, step loop and tokenisation with and without the caches, alternated (see module doc)."""
    from functools import partial
    from types import SimpleNamespace

    import torch

    from bench import allocator_steady
    from misp.data.encoding import encode_records
    from misp.data.records import read_sft_records
    from misp.data.sft_data import SFTDataModule, _SFTDataset
    from misp.models import prompting
    from misp.models.forward import response_logits
    from misp.models.tokenizer import read_vocabulary
    from misp.testing.tiny_llava import TinyLlavaConfig, build_tiny_llava

    world, repeat = Path(cfg["world"]), cfg["repeat"]
    torch.manual_seed(0)
    model, processor = build_tiny_llava(read_vocabulary(world), TinyLlavaConfig())  # the demo's sizes
    allocator_steady()

    # (b) setup's tokenisation, exactly SFTDataModule.setup's call, prompt cache off vs on (emptied first).
    read = read_sft_records(world / "sft.jsonl")
    if cfg["tokenise_records"]:
        read.records[:] = read.records[: cfg["tokenise_records"]]
        read.lines = read.lines[: cfg["tokenise_records"]] if read.lines else read.lines
    encode = partial(prompting.encode_example, processor, max_length=256)
    default_size = prompting.PROMPT_CACHE_SIZE

    def tokenise(cached: bool) -> tuple[float, list]:
        prompting.PROMPT_CACHE_SIZE = default_size if cached else 0
        prompting.clear_prompt_cache()
        t0 = time.perf_counter()
        _, encoded = encode_records(read, ("response",), encode, "raise")
        return time.perf_counter() - t0, encoded

    tok: dict[str, list[float]] = {"off": [], "on": []}
    encodings: dict[str, list] = {}
    try:
        for rep in range(repeat):
            for name in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                seconds, encoded = tokenise(name == "on")
                tok[name].append(seconds)
                encodings.setdefault(name, encoded)
    finally:
        prompting.PROMPT_CACHE_SIZE = default_size
    if encodings["on"] != encodings["off"]:
        raise RuntimeError("the prompt cache changed an encoding")
    del encodings

    # (a) batch fetching over the real SFT data: the datamodule's own train_dataloader and collate.
    def datamodule(mb: int) -> SFTDataModule:
        dm = SFTDataModule(train_file=str(world / "sft.jsonl"), batch_size=32, image_cache_mb=mb)
        dm.attach(SimpleNamespace(processor=processor))
        dm.setup("fit")
        if cfg["fetch_batches"]:  # a bounded pass: the first N batches' worth of records
            n = cfg["fetch_batches"] * 32
            dm.train_set = _SFTDataset(dm.train_set.records[:n], dm.train_set.encoded[:n])
        return dm

    off, on = datamodule(0), datamodule(512)
    n_records = len(on.train_set)
    n_images = len({str(r.image) for r in on.train_set.records})

    def fetch_pass(dm: SFTDataModule) -> tuple[float, int]:
        t0 = time.perf_counter()
        n = sum(1 for _ in dm.train_dataloader())
        return time.perf_counter() - t0, n

    fetch: dict[str, list[float]] = {"off": [], "cold": [], "warm": []}
    cold_hit_rate = []
    for rep in range(repeat):
        for name in ("off", "cold") if rep % 2 == 0 else ("cold", "off"):
            if name == "off":
                fetch["off"].append(fetch_pass(off)[0])
                continue
            on.pixel_cache.clear()
            seconds, n_batches = fetch_pass(on)
            fetch["cold"].append(seconds)
            cold_hit_rate.append(on.pixel_cache.hits / max(1, on.pixel_cache.hits + on.pixel_cache.misses))
            fetch["warm"].append(fetch_pass(on)[0])  # the cache now holds every image of the pass
    cache_mib = on.pixel_cache.nbytes / 2**20

    # (a) the training step loop: fetch, forward and loss, backward, AdamW; cache off vs warm.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step_loop(dm: SFTDataModule) -> float:
        loader = iter(dm.train_dataloader())
        t0 = time.perf_counter()
        for _ in range(cfg["step_batches"]):
            batch = next(loader)
            logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"],
                                              batch["pixel_values"], batch["labels"])
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step_loop(off)  # warm-up (allocator, kernels)
    steps: dict[str, list[float]] = {"off": [], "warm": []}
    for rep in range(repeat):
        for name in ("off", "warm") if rep % 2 == 0 else ("warm", "off"):
            steps[name].append(step_loop(off if name == "off" else on))

    return {
        "records": n_records, "images": n_images, "batches_per_pass": n_batches, "cache_mib": cache_mib,
        "tokenised_records": len(read.records), "prompts": len({r.prompt for r in read.records}),
        "cold_hit_rate": statistics.median(cold_hit_rate),
        "tokenise": {**_summary(tok["off"], tok["on"]), "times": tok},
        "fetch_cold": {**_summary(fetch["off"], fetch["cold"]), "times": fetch},
        "fetch_warm": _summary(fetch["off"], fetch["warm"]),
        "steps": {**_summary(steps["off"], steps["warm"]), "times": steps},
    }


def _world(args: argparse.Namespace) -> Path:
    """The Shapes world to read: ``--sft-world``, else the demo's, made by its ``misp world`` stage when missing."""
    if args.sft_world:
        world = Path(args.sft_world)
        if not (world / "sft.jsonl").is_file():
            raise FileNotFoundError(f"--sft-world {world}: no sft.jsonl there; make one with `misp world --out {world}`")
        return world
    from misp.demo import pipeline, run_stage

    for stage in pipeline(all_methods=False):
        if stage.name == "world" and not stage.done_when.exists():
            run_stage(stage, force=True)
    return REPO / "worlds" / "shapes"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fetching, step loop and tokenisation of the SFT stage with and without its caches."""
    from bench import run_child

    for option in ("cache_repeat", "cache_step_batches"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be positive")
    if args.cache_fetch_batches < 0:
        raise ValueError("--cache-fetch-batches must be >= 0 (0: the whole epoch)")
    cfg = {"world": str(_world(args)), "repeat": 2 if args.quick else args.cache_repeat,
           "fetch_batches": 3 if args.quick else args.cache_fetch_batches,
           "step_batches": 2 if args.quick else args.cache_step_batches,
           "tokenise_records": 96 if args.quick else 0}
    res = run_child("bench.sft_cache:sft_cache_child", cfg, args.threads)
    n, b = cfg["repeat"], res["batches_per_pass"]
    rows = [
        {"what": f"setup's tokenisation ({res['tokenised_records']} records, {res['prompts']} prompts)",
         "before": "prompt cache off", "after": "prompt cache on", **res["tokenise"]},
        {"what": f"fetching one epoch ({b} batches of 32, {res['images']} images), first epoch",
         "before": "pixel cache off", "after": f"cold (hit rate {res['cold_hit_rate']:.2f})", **res["fetch_cold"]},
        {"what": f"fetching one epoch ({b} batches of 32), every later epoch", "before": "pixel cache off",
         "after": f"warm ({res['cache_mib']:.0f} MiB)", **res["fetch_warm"]},
        {"what": f"training step loop, {cfg['step_batches']} batches (fetch, forward, backward, AdamW)",
         "before": "pixel cache off", "after": "warm", **res["steps"]},
    ]
    return {
        "config": cfg,
        "result": res,
        "tables": [{
            "title": f"The SFT stage's caches, before and after, alternated in one process ({n} repeats; "
                     "medians, speed-up = before / after per repeat)",
            "columns": [("what", "what"), ("before", "before"), ("after", "after"), ("before_s", "before (s)"),
                        ("after_s", "after (s)"), ("ratio", "speed-up"), ("range", "range")],
            "rows": rows,
        }],
    }
