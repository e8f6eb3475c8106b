"""``misp eval``: a model (hub id or folder, optionally with a LoRA adapter) on published benchmarks.

    misp eval --model llava-hf/llava-1.5-7b-hf --benchmarks pope,hallusionbench,mmvp,amber,objhal \\
        --data_root ~/benchmarks --out runs/eval/base
    misp eval --model runs/misp/export --benchmarks pope,mmvp --data_root ~/benchmarks --out runs/eval/misp \\
        --compare runs/eval/base

Every benchmark's questions are read and checked before the model loads (a bad file fails in the first
second). Answers are generated greedily in length-sorted batches, judged, and appended to
``<out>/generations/<benchmark>.jsonl`` as they come; a rerun with the same ``--out`` asks only the
questions not answered yet. Scores are computed from those files and written to ``<out>/results.json``;
the papers' table (this run beside the ``--compare`` runs) is printed at the end.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import nn
from tqdm.auto import tqdm
from transformers import ProcessorMixin

from misp.errors import ConfigError
from misp.eval.amber import AMBER
from misp.eval.benchmark import Benchmark
from misp.eval.generate import generate_answers, longest_first
from misp.eval.generations import GenerationsFile
from misp.eval.hallusionbench import HallusionBench
from misp.eval.judge import ChatJudge, JudgeConfig
from misp.eval.metrics import format_results
from misp.eval.mmhal import MMHalBench
from misp.eval.mmvp_bench import MMVP
from misp.eval.objhal import ObjectHalBench
from misp.eval.pope import POPE
from misp.eval.table import paper_table
from misp.utils.io import atomic_write_json

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, type[Benchmark]] = {
    "pope": POPE,
    "hallusionbench": HallusionBench,
    "mmvp": MMVP,
    "amber": AMBER,
    "objhal": ObjectHalBench,
    "mmhal": MMHalBench,
}
"""``--benchmarks`` names -> their classes; each reads ``<data_root>/<name>/``."""


def build_benchmarks(names: Sequence[str], data_root: str | Path, limit: int | None = None,
                     judge: JudgeConfig | None = None) -> list[Benchmark]:
    """The named benchmarks over ``data_root``; an unknown name or a judge-less MMHal is a ConfigError."""
    out = []
    for name in names:
        if name not in BENCHMARKS:
            raise ConfigError(f"unknown benchmark {name!r}; misp evaluates {', '.join(BENCHMARKS)}")
        root = Path(data_root).expanduser() / name
        if name == "mmhal":
            if judge is None or judge.resolved_url() is None:
                raise ConfigError("mmhal is scored by an LLM judge and none is configured: set --judge.url "
                                  "(or MISP_JUDGE_URL) to an OpenAI-compatible endpoint, or leave mmhal out")
            out.append(MMHalBench(root, limit, ChatJudge(judge)))
        else:
            out.append(BENCHMARKS[name](root, limit))
    return out


def evaluate_benchmark(
    benchmark: Benchmark,
    questions: Sequence,
    model: nn.Module,
    processor: ProcessorMixin,
    out_dir: str | Path,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Answer the questions not yet in ``<out_dir>/generations/<name>.jsonl``, then score them all.

    Args:
        benchmark: The benchmark (its judge and metric).
        questions: Its questions (``benchmark.questions()``).
        model: The VLM.
        processor: Its processor.
        out_dir: The run's folder.
        batch_size: Prompts per generate call.
        max_new_tokens: Caps every answer's length (None: each benchmark's own, as published).
        progress: Show a progress bar.
    """
    store = GenerationsFile(Path(out_dir) / "generations" / f"{benchmark.name}.jsonl")
    unjudged = [q for q in questions if q.id in store and store.records[q.id]["judgement"] is None]
    if unjudged:
        # Answers kept when the judge failed last time: judged now, never generated again.
        log.info("%s: judging %d answers kept from an interrupted run", benchmark.name, len(unjudged))
        for q in unjudged:
            store.records[q.id]["judgement"] = benchmark.judge(q, store.records[q.id]["answer"])
        store.rewrite()
    todo = [q for q in questions if q.id not in store]
    done = len(questions) - len(todo)
    if done:
        log.info("%s: %d of %d questions already answered in %s; asking the other %d",
                 benchmark.name, done, len(questions), store.path, len(todo))
    order = [todo[i] for i in longest_first(processor, [q.prompt for q in todo])]
    groups: dict[int, list] = {}
    for q in order:
        limit = q.max_new_tokens or benchmark.max_new_tokens
        groups.setdefault(min(limit, max_new_tokens) if max_new_tokens else limit, []).append(q)
    with tqdm(total=len(questions), initial=done, desc=benchmark.name, disable=not progress) as bar:
        for tokens, group in groups.items():
            for start in range(0, len(group), batch_size):
                batch = group[start : start + batch_size]
                answers = generate_answers(model, processor, [q.image for q in batch], [q.prompt for q in batch],
                                           max_new_tokens=tokens, batch_size=batch_size)
                records = [{"id": q.id, "prompt": q.prompt, "answer": a, "judgement": None}
                           for q, a in zip(batch, answers, strict=True)]
                try:
                    for q, r in zip(batch, records, strict=True):
                        r["judgement"] = benchmark.judge(q, r["answer"])
                finally:
                    # A judge that fails (an HTTP endpoint down) costs no generated answer: those not yet
                    # judged are kept with judgement null and judged when the run resumes.
                    store.append(records)
                bar.update(len(batch))
    metric = benchmark.metric()
    metric.update([store.records[q.id]["judgement"] for q in questions])
    return metric.compute()


def load_model(model: str, adapter: str | None, dtype: str, device: str) -> tuple[nn.Module, ProcessorMixin]:
    """The model to evaluate, in eval mode on ``device`` ("auto": the GPU when there is one)."""
    from misp.models.vlm import VLMSpec, load_vlm

    vlm, processor = load_vlm(VLMSpec(path=model, adapter=adapter, dtype=dtype))
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    return vlm.to(target).eval(), processor


def read_results(path: str | Path) -> dict[str, float]:
    """The results of an earlier ``misp eval`` (its folder or its results.json)."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--compare {path}: no results.json there (run misp eval with that --out first)")
    return dict(json.loads(file.read_text())["results"])


def eval_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="misp eval", description="Evaluate a VLM on published hallucination benchmarks.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with these options.")
    parser.add_argument("--model", type=str, required=True, help="Hub id or folder of the model (base or merged export).")
    parser.add_argument("--adapter", type=str | None, default=None, help="A peft LoRA adapter folder to attach.")
    parser.add_argument("--benchmarks", type=str, default="pope",
                        help=f"Comma-separated, from: {', '.join(BENCHMARKS)}.")
    parser.add_argument("--data_root", type=str, required=True,
                        help="Folder with one sub-folder per benchmark in its authors' layout (docs/evaluation.md).")
    parser.add_argument("--out", type=str, required=True,
                        help="Run folder: results.json and generations/; rerunning with it resumes.")
    parser.add_argument("--name", type=str | None, default=None, help="The run's row name in the table (default: --out's name).")
    parser.add_argument("--compare", type=str | None, default=None,
                        help="Earlier runs' folders (comma-separated) to show beside this one in the table.")
    parser.add_argument("--batch_size", type=int, default=8, help="Prompts per generate call.")
    parser.add_argument("--max_new_tokens", type=int | None, default=None,
                        help="Cap on every answer's length; None: each benchmark's own (as published).")
    parser.add_argument("--limit", type=int | None, default=None,
                        help="First N questions of each file only (a smoke test; scores not comparable).")
    parser.add_argument("--dtype", type=str, default="bfloat16", help="float32, bfloat16 or float16.")
    parser.add_argument("--device", type=str, default="auto", help="auto (GPU if any), cpu or cuda[:N].")
    parser.add_argument("--quiet", type=bool, default=False, help="No progress bars.")
    parser.add_class_arguments(JudgeConfig, "judge", help="The LLM judge (MMHal-Bench only).")
    return parser


def run_eval(argv: Sequence[str]) -> dict[str, float]:
    """``misp eval``'s body: parse, check every benchmark's files, load, answer, score, report."""
    parser = eval_parser()
    cfg = parser.parse_args(list(argv))
    names = [n.strip() for n in cfg.benchmarks.split(",") if n.strip()]
    if not names:
        raise ConfigError("--benchmarks names no benchmark")
    if cfg.batch_size < 1 or (cfg.max_new_tokens is not None and cfg.max_new_tokens < 1):
        raise ConfigError("--batch_size and --max_new_tokens must be positive")
    judge = JudgeConfig(**vars(cfg.judge)) if cfg.judge is not None else None
    benchmarks = build_benchmarks(names, cfg.data_root, cfg.limit, judge)
    compare = {Path(p).name: read_results(p) for p in (cfg.compare or "").split(",") if p.strip()}
    questions = {b.name: b.questions() for b in benchmarks}  # every file checked before the model loads
    model, processor = load_model(cfg.model, cfg.adapter, cfg.dtype, cfg.device)
    out = Path(cfg.out)
    results: dict[str, float] = {}
    for b in benchmarks:
        results.update(evaluate_benchmark(b, questions[b.name], model, processor, out, cfg.batch_size,
                                          cfg.max_new_tokens, progress=not cfg.quiet))
        # After each benchmark, so a later failure keeps the finished scores.
        atomic_write_json(out / "results.json", {"model": cfg.model, "adapter": cfg.adapter, "benchmarks": names,
                                                 "limit": cfg.limit, "results": results})
    print(format_results(results))
    print()
    print(paper_table({**compare, (cfg.name or out.name): results}))
    print(f"\nwrote {out / 'results.json'} and {out / 'generations'}/")
    return results
