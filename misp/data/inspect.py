"""``misp data inspect``: what a fit will see of its preference records, before any GPU time is spent.

It parses the same ``--config`` files (and overrides) as ``misp fit``, builds the configured datamodule,
reads its records through the datamodule's own reader and encodes them with its own encoding
(:meth:`NegativeSamplerDataModule.encode_pairs`), so every count is the fit's. It loads the model's
processor (tokenizer, image processor, chat template) and no weights. Records are read with
``on_bad_record: skip`` so that every bad one is listed; a fit configured with ``raise`` stops at the first.

It prints the rows read and kept, each skipped record with its file or dataset row and reason, the
token lengths of prompts (image tokens included) and responses, image sizes and the image tokens they
give, and how many pairs ``max_length`` truncates or skips.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

MAX_LISTED = 20
"""Skipped records listed one by one; the rest are counted."""

PERCENTILES = (50, 90, 99, 100)


def inspect_parser() -> ArgumentParser:
    """``misp data inspect``'s parser: a fit's config files and overrides (only ``data`` and ``model`` are used)."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(
        prog="misp data inspect",
        description="Read the configured preference records as `misp fit` would and report what the fit will see.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="The fit's config file(s), in the same order.")
    parser.add_lightning_class_args(L.LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(L.LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--trainer", type=dict | None, default=None, help="Read and ignored (no Trainer is built).")
    parser.add_argument("--seed_everything", type=bool | int | None, default=None, help="Read and ignored.")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Read and ignored.")
    parser.add_argument("--limit", type=int | None, default=None, help="Inspect only the first N records (all: None).")
    return parser


def load_processor(vlm: Any) -> Any:
    """The processor of a ``VLMSpec`` (or its dict form) without loading the model's weights."""
    from transformers import AutoProcessor

    from misp.models.vlm import VLMSpec

    spec = vlm if isinstance(vlm, VLMSpec) else VLMSpec(**dict(vlm))
    if spec.path is not None:
        options = {k: v for k, v in spec.extra.items() if k in ("revision", "cache_dir")}
        return AutoProcessor.from_pretrained(spec.path, **options)
    # A tiny random-weight stand-in (tests, smoke runs) is built whole: it has no weights of its own to load
    # (only its tiny CLIP tower when `tiny.vision_init` names one, which also sets the image geometry).
    from misp.models.tiny_llava import TinyLlavaConfig, build_tiny_llava
    from misp.models.tokenizer import read_vocabulary

    tiny = spec.tiny if isinstance(spec.tiny, TinyLlavaConfig) else TinyLlavaConfig(**dict(spec.tiny or {}))
    return build_tiny_llava(read_vocabulary(spec.vocabulary), tiny)[1]


def _percentiles(values: list[float]) -> dict[int, float]:
    import numpy as np

    if not values:
        return {}
    return {p: float(np.percentile(np.asarray(values, dtype=float), p)) for p in PERCENTILES}


def _image_size(path: Path, cache: dict[Path, tuple[int, int] | None]) -> tuple[int, int] | None:
    if path not in cache:
        from PIL import Image

        try:
            with Image.open(path) as im:  # the header only: no pixel decoding
                cache[path] = im.size
        except OSError:
            cache[path] = None
    return cache[path]


def inspect_datamodule(dm: Any, processor: Any, limit: int | None = None) -> dict[str, Any]:
    """What a fit would see of ``dm``'s preference records, as a dict (``format_report`` prints it)."""
    from misp.models.prompting import IGNORE_INDEX, encode_example, example_length, num_image_tokens

    h = dm.hparams
    configured, truncation, max_length = h.on_bad_record, h.truncation, h.max_length
    # List every bad record, not only the first; pass every pair through so that the long ones are counted
    # here against the configured max_length (the fit's encoding would stop or cut them).
    h.on_bad_record, h.truncation, h.max_length = "skip", "skip", 2**62
    try:
        records = dm._read_records()
        read = dm._read
        if limit is not None:
            read.records, read.lines = read.records[:limit], read.lines[:limit]
            records = read.records
        dm.records = records
        encoded, unlimited = dm.encode_pairs(processor)
    finally:
        h.on_bad_record, h.truncation, h.max_length = configured, truncation, max_length

    unencodable = []
    for i, (r, line) in enumerate(zip(records, read.lines, strict=True)):
        if unlimited[i] is not None:
            continue
        reason = "cannot be encoded"
        for name in ("chosen", "rejected"):
            try:
                encode_example(processor, r.prompt, getattr(r, name), history=getattr(r, "history", ()))
            except ValueError as e:
                reason = f"field '{name if not str(e).startswith('the prompt') else 'prompt'}': {e}"
                break
        where = f"{read.path} [split {read.split}] row {line}" if read.split is not None else f"{read.path}:{line}"
        unencodable.append(f"{where}: record {r.id!r}: {reason}")

    prompt_lengths, response_lengths, longest, per_image = [], [], [], []
    for whole in unlimited:
        if whole is None:
            continue
        for e in whole:
            # A dynamic-resolution row holds one placeholder for its image's tokens (example_length).
            n_prompt = sum(1 for label in e["labels"] if label == IGNORE_INDEX) + example_length(e) - len(e["input_ids"])
            prompt_lengths.append(n_prompt)
            response_lengths.append(example_length(e) - n_prompt)
        longest.append(max(example_length(e) for e in whole))
        if "image_tokens" in whole[0]:
            per_image.append(whole[0]["image_tokens"])
    over = sum(1 for n in longest if n > h.max_length)
    # truncate cuts responses only: a prompt (with its image tokens) longer than max_length stops the fit.
    prompt_over = sum(1 for n in prompt_lengths if n >= h.max_length)
    trained = {"skip": len(longest) - over, "truncate": len(longest), "raise": 0 if over else len(longest)}[truncation]
    sizes: dict[Path, tuple[int, int] | None] = {}
    widths, heights = [], []
    for r in records:
        size = _image_size(Path(r.image), sizes)
        if size is not None:
            widths.append(size[0])
            heights.append(size[1])
    try:
        image_tokens: Any = num_image_tokens(processor)
    except ValueError as e:
        image_tokens = _percentiles(per_image) if per_image else f"unknown ({e})"
    skipped = [str(e) for e in read.skipped]
    reasons = Counter(re.split(r"[:(]", e.reason, maxsplit=1)[0].strip() for e in read.skipped)
    return {
        "source": str(read.path),
        "split": read.split,
        "layout": h.layout,
        "rows": read.rows,
        "valid": len(records),
        "skipped": skipped,
        "skip_reasons": dict(reasons.most_common()),
        "unencodable": unencodable,
        "conversations": sum(1 for r in records if r.history),
        "trained": trained,
        "max_length": h.max_length,
        "truncation": h.truncation,
        "over_max_length": over,
        "prompts_over_max_length": prompt_over,
        "prompt_tokens": _percentiles(prompt_lengths),
        "response_tokens": _percentiles(response_lengths),
        "pair_tokens": _percentiles(longest),
        "image_width": _percentiles(widths),
        "image_height": _percentiles(heights),
        "distinct_images": len(sizes),
        "image_tokens": image_tokens,
        "on_bad_record": configured,
    }


def _row(name: str, values: dict[int, float]) -> str:
    if not values:
        return f"  {name:<22} (none)"
    cells = "  ".join(f"p{p}={values[p]:.0f}" if p != 100 else f"max={values[p]:.0f}" for p in PERCENTILES)
    return f"  {name:<22} {cells}"


def format_report(s: dict[str, Any]) -> str:
    """The inspection as the lines ``misp data inspect`` prints."""
    where = s["source"] + (f" [split {s['split']}]" if s["split"] is not None else "")
    lines = [
        f"records: {where}  (layout {s['layout']})",
        f"  rows read {s['rows']}, valid {s['valid']}, skipped {len(s['skipped'])}, cannot be encoded "
        f"{len(s['unencodable'])}; conversations (multi-turn) {s['conversations']}",
    ]
    bad = s["skipped"] + s["unencodable"]
    if bad:
        lines.append(f"skipped records ({len(bad)}; a fit with on_bad_record={s['on_bad_record']}"
                     + (" stops at the first):" if s["on_bad_record"] == "raise" else " skips them):"))
        lines += [f"  {e}" for e in bad[:MAX_LISTED]]
        if len(bad) > MAX_LISTED:
            lines.append(f"  ... and {len(bad) - MAX_LISTED} more")
        if s["skip_reasons"]:
            lines.append("  by reason: " + ", ".join(f"{k} x{v}" for k, v in s["skip_reasons"].items()))
    lines.append("token lengths (prompt includes the image tokens):")
    lines.append(_row("prompt", s["prompt_tokens"]))
    lines.append(_row("response (+EOS)", s["response_tokens"]))
    lines.append(_row("longest of each pair", s["pair_tokens"]))
    if isinstance(s["image_tokens"], dict):  # dynamic resolution: each image's count follows its size
        lines.append(f"images: {s['distinct_images']} distinct; image tokens per image (from its size):")
        lines.append(_row("image tokens", s["image_tokens"]))
    else:
        lines.append(f"images: {s['distinct_images']} distinct; image tokens per image: {s['image_tokens']}")
    lines.append(_row("width (px)", s["image_width"]))
    lines.append(_row("height (px)", s["image_height"]))
    action = {"skip": "skipped", "truncate": "truncated", "raise": "an error (the fit stops)"}[s["truncation"]]
    lines.append(
        f"max_length {s['max_length']}: {s['over_max_length']} pairs are longer, so {action} (truncation: "
        f"{s['truncation']}); {s['trained']} pairs train" + (" (the fit stops: nothing to train)" if not s["trained"] else "")
    )
    if s["prompts_over_max_length"] and s["truncation"] == "truncate":
        lines.append(f"  {s['prompts_over_max_length']} prompts leave no room for a response: truncate cannot fit them "
                     "(the fit stops); raise max_length")
    return "\n".join(lines)


def run_inspect(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv`` (the fit's ``--config`` files and overrides), inspect, print the report; return the summary."""
    from misp.errors import ConfigError

    parser = inspect_parser()
    from misp.config_layers import check_method_home, merged_terms_args

    check_method_home(argv)
    cfg = parser.parse_args(merged_terms_args(argv))  # layered files merge the method's terms as `misp fit` does
    data_parser = ArgumentParser()
    import lightning as L

    data_parser.add_subclass_arguments(L.LightningDataModule, "data")
    built = data_parser.instantiate_classes(Namespace(data=copy.deepcopy(cfg.data)))
    dm = built.data
    if not hasattr(dm, "encode_pairs"):
        raise ConfigError(f"misp data inspect reads preference records; {type(dm).__name__} has none")
    vlm = getattr(cfg.model.init_args, "vlm", None)
    if vlm is None:
        raise ConfigError("misp data inspect needs model.init_args.vlm (the model whose processor encodes the records)")
    processor = load_processor(vlm.as_dict() if isinstance(vlm, Namespace) else vlm)
    summary = inspect_datamodule(dm, processor, cfg.limit)
    print(format_report(summary))
    return summary
