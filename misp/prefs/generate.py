"""CLIP-DPO preference generation end to end (method.md section 5): ``misp prefs``.

For each input (image, prompt): sample ``n`` responses from the VLM, apply the rule filters
(``misp.prefs.filters``), score the survivors with CLIP per sentence (``misp.prefs.scoring``), and keep
the best and worst as (chosen, rejected). Writes, each atomically:

- ``output_file``: preference records in misp's JSON Lines format (``id``, ``image`` relative to the
  file's folder unless ``absolute_paths``, ``prompt``, ``chosen``, ``rejected``, ``meta`` with the scores,
  token counts, candidate counts, and the ground-truth objects and hallucination counts when known);
- ``summary_file``: inputs, pairs, what each rule removed in order, score statistics, pair precision
  (when ground truth and a vocabulary are given), the CLIP identity and the full config;
- ``candidates_file`` (optional): every example's samples with their scores and fates.

Sampling is seeded per chunk of ``sampling.batch_size`` inputs (chunk k uses ``seed + k``, as
``generate`` seeds its batches), so a fixed config reproduces the same files byte for byte on the same
hardware and software. Inputs are processed chunk by chunk, so only one chunk of images is in memory.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from misp.eval.parsing import MentionExtractor
from misp.images import load_rgb
from misp.models.clip import load_clip
from misp.models.generation import generate
from misp.models.vlm import is_quantized, load_vlm
from misp.negatives.embed import embed_images
from misp.prefs.config import PrefsConfig
from misp.prefs.filters import (
    CHOSEN,
    REJECTED,
    SURVIVED,
    Candidate,
    FilterLedger,
    Pair,
    pair_candidates,
    prepare_candidates,
    survivors,
)
from misp.prefs.inputs import PromptInput, read_inputs
from misp.prefs.precision import count_hallucinations, load_vocabulary, pair_precision
from misp.prefs.scoring import score_responses, text_heavy_probability
from misp.utils.io import atomic_write_json, atomic_write_jsonl, check_writable

log = logging.getLogger(__name__)

METHOD = "clip_dpo"
"""``meta.method`` of the records this module writes."""
_DIGITS = 4  # scores in the written files: enough to reproduce the rules, short enough to read


def resolve_device(device: str) -> torch.device:
    """``auto`` is cuda when available, else cpu; anything else is taken as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def summary_path(config: PrefsConfig) -> Path:
    """Where the summary goes: ``summary_file``, or ``<output stem>.summary.json`` beside the output."""
    if config.summary_file is not None:
        return Path(config.summary_file)
    out = Path(config.output_file)
    return out.with_name(f"{out.stem}.summary.json")


def _image_field(image: Path, out_dir: Path, absolute: bool) -> str:
    if absolute:
        return str(image)
    return Path(os.path.relpath(image, out_dir.absolute())).as_posix()


def _round(x: float) -> float:
    return round(float(x), _DIGITS)


def _record(
    inp: PromptInput,
    pair: Pair,
    n_sampled: int,
    n_survived: int,
    image: str,
    extractor: MentionExtractor | None,
) -> dict:
    meta = {
        "method": METHOD,
        "scores": {"chosen": _round(pair.chosen.score), "rejected": _round(pair.rejected.score)},
        "gap": _round(pair.gap),
        "sentence_scores": {
            "chosen": [_round(s) for s in pair.chosen.sentence_scores],
            "rejected": [_round(s) for s in pair.rejected.sentence_scores],
        },
        "tokens": {"chosen": pair.chosen.tokens, "rejected": pair.rejected.tokens},
        "candidates": n_sampled,
        "survivors": n_survived,
    }
    if inp.objects is not None:
        meta["objects"] = list(inp.objects)
        if extractor is not None:
            meta["hallucinations"] = {
                "chosen": count_hallucinations(pair.chosen.text, inp.objects, extractor),
                "rejected": count_hallucinations(pair.rejected.text, inp.objects, extractor),
            }
    return {
        "id": inp.id,
        "image": image,
        "prompt": inp.prompt,
        "chosen": pair.chosen.text,
        "rejected": pair.rejected.text,
        "meta": meta,
    }


def _score_stats(scores: list[float]) -> dict | None:
    if not scores:
        return None
    mean = math.fsum(scores) / len(scores)
    var = math.fsum((s - mean) ** 2 for s in scores) / len(scores)
    return {"count": len(scores), "mean": _round(mean), "std": _round(math.sqrt(var)), "min": _round(min(scores)),
            "max": _round(max(scores))}  # fmt: skip


def run_prefs(config: PrefsConfig) -> dict:
    """Generate, score, filter and pair; write the records, the summary and optionally the candidates.

    Returns:
        The summary (also written to ``summary_path(config)``).
    """
    # Every output is checked before sampling, which may take hours, rather than when it is written.
    check_writable(config.output_file, "output_file")
    check_writable(summary_path(config), "summary_file")
    if config.candidates_file is not None:
        check_writable(config.candidates_file, "candidates_file")
    inputs = read_inputs(
        config.input_file, config.image_root, config.objects_key, config.prompt, config.limit
    )
    vocabulary = load_vocabulary(config.objects) if config.objects is not None else None
    extractor = MentionExtractor(vocabulary) if vocabulary is not None else None
    device = resolve_device(config.device)
    out_path = Path(config.output_file)
    out_dir = out_path.parent
    f, s = config.filters, config.sampling

    clip = load_clip(config.clip, device)
    cache = Path(config.cache_dir) / "prefs_images" if config.cache_dir is not None else None
    image_emb = embed_images(
        clip, [i.image for i in inputs], batch_size=config.scoring.batch_size, cache_path=cache, device=device,
        progress=config.progress,
    )  # fmt: skip
    ledger = FilterLedger(f)
    ledger.images = len(inputs)
    keep = list(range(len(inputs)))
    if f.text_heavy:
        p_text = text_heavy_probability(clip, image_emb, f.text_heavy_prompt, f.photo_prompt, device)
        keep = [i for i in keep if p_text[i] <= f.text_heavy_threshold]
        ledger.remove("text_heavy", len(inputs) - len(keep))

    model, processor = load_vlm(config.vlm)
    if config.vlm.device_map is None and not is_quantized(model):
        model.to(device)
    tokenizer = processor.tokenizer

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    records, rows, triples, scored = [], [], [], []
    with tqdm(total=len(keep), desc="prefs", unit="img", disable=not config.progress) as bar:
        for k, start in enumerate(range(0, len(keep), s.batch_size)):
            chunk = keep[start : start + s.batch_size]
            samples = generate(
                model, processor, [load_rgb(inputs[i].image) for i in chunk], [inputs[i].prompt for i in chunk],
                max_new_tokens=s.max_new_tokens, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                num_return_sequences=s.n, seed=s.seed + k, batch_size=s.batch_size,
            )  # fmt: skip
            ledger.generated += s.n * len(chunk)
            candidates = [prepare_candidates(texts, count_tokens, f, ledger) for texts in samples]
            alive = [survivors(cs) for cs in candidates]
            scores = score_responses(
                clip, image_emb[chunk], [[c.text for c in a] for a in alive], how=config.scoring.aggregate,
                batch_size=config.scoring.batch_size, device=device,
            )  # fmt: skip
            for a, sc in zip(alive, scores, strict=True):
                for c, r in zip(a, sc, strict=True):
                    c.score, c.sentence_scores = r.score, r.sentences
                    scored.append(r.score)
            for i, cs in zip(chunk, candidates, strict=True):
                inp = inputs[i]
                pair, outcome = pair_candidates(cs, f, ledger)
                n_alive = sum(c.fate in (CHOSEN, REJECTED, SURVIVED) for c in cs)
                image = _image_field(inp.image, out_dir, config.absolute_paths)
                if pair is not None:
                    records.append(_record(inp, pair, len(cs), n_alive, image, extractor))
                    if inp.objects is not None:
                        triples.append((pair.chosen.text, pair.rejected.text, inp.objects))
                if config.candidates_file is not None:
                    rows.append(_candidates_row(inp, image, outcome, cs))
            bar.update(len(chunk))

    precision = pair_precision(triples, vocabulary).to_dict() if vocabulary is not None else None
    summary = {
        "method": METHOD,
        "input_file": str(config.input_file),
        "output_file": str(config.output_file),
        "inputs": len(inputs),
        "candidates": ledger.generated,
        "pairs": len(records),
        "rules": ledger.summary(),
        "scores": _score_stats(scored),
        "precision": precision,
        "clip": str(clip.identity),
        "config": asdict(config),
    }
    if not records:
        log.warning("no pair survived the filters; see %s for what each rule removed", summary_path(config))
    atomic_write_jsonl(out_path, records)
    if config.candidates_file is not None:
        atomic_write_jsonl(config.candidates_file, rows)
    atomic_write_json(summary_path(config), summary)
    return summary


def _candidates_row(inp: PromptInput, image: str, outcome: str, candidates: list[Candidate]) -> dict:
    return {
        "id": inp.id,
        "image": image,
        "prompt": inp.prompt,
        "pair": outcome,
        "candidates": [
            {
                "index": c.index,
                "text": c.text,
                "tokens": c.tokens,
                "score": None if c.score is None else _round(c.score),
                "sentence_scores": [_round(x) for x in c.sentence_scores],
                "fate": c.fate,
            }
            for c in candidates
        ],
    }


def format_summary(summary: dict) -> str:
    """The summary as a few human-readable lines: the rule table, then pairs and precision."""
    lines = [
        f"{summary['inputs']} inputs, {summary['candidates']} candidates sampled, {summary['pairs']} pairs"
    ]
    lines.append(f"{'rule':<14}{'level':<11}{'threshold':>10}{'removed':>9}{'left':>8}")
    for r in summary["rules"]:
        threshold = "off" if not r["enabled"] else ("-" if r["threshold"] is None else str(r["threshold"]))
        lines.append(f"{r['rule']:<14}{r['level']:<11}{threshold:>10}{r['removed']:>9}{r['left']:>8}")
    if summary.get("scores"):
        sc = summary["scores"]
        lines.append(
            f"CLIP scores of scored candidates: mean {sc['mean']}, std {sc['std']}, min {sc['min']}, max {sc['max']}"
        )
    p = summary.get("precision")
    if p is not None and p["precision"] is not None:
        lines.append(
            f"pair precision {p['precision']:.3f} ({p['correct']} of {p['pairs']} chosen hallucinate less; "
            f"{p['ties']} ties, {p['inverted']} inverted; mean hallucinations chosen "
            f"{p['chosen_hallucinations']:.3f}, rejected {p['rejected_hallucinations']:.3f})"
        )
    elif p is not None:
        lines.append("pair precision: no pairs to measure")
    return "\n".join(lines)
