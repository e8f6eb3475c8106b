"""Padding-free packing (issue 23, item 2): a preference forward's rows of varied lengths, padded against
bin-packed, side by side in one process.

One step is the forward + backward of the summed response log-probs of a MISP-DPO batch's rows, as the
module concatenates them: for each of B records, the chosen and the rejected response on its image and
the chosen under K negative images (other records' images), responses of varied lengths. Layouts, each
through ``misp.models.forward.response_logits``:

- ``unshared``: every row on its own, right-padded to the longest (``prefix_sharing=False``).
- ``shared``: the rows sharing image and prompt packed into one row each, every row padded to the longest
  packed row, when that runs fewer tokens (misp's default before bin packing: ``prefix_sharing=True``).
- ``packed``: the same sequences bin-packed several to a row (``padding_free=True``), under the per-batch
  rule (``misp.models.prefix_sharing.choose_layout``): the cheapest layout runs.
- ``bins xM`` (``--pf-capacities``): the shared sequences bin-packed into rows of up to M times the longest,
  forced past the rule (which only considers M = 1), to see whether longer rows with less padding pay.

Beside each measured speedup, the rule's cost model's prediction (``layout_cost``: tokens through the
linear layers and dense attention pairs; the vision tower and LM head, alike in every layout, left out).

Three geometries: LLaVA-1.5 (576 image tokens per row) and Qwen2.5-VL with mixed image sizes (448x448 and
560x448 images: 256 and 320 image tokens), the decoder at ``bench trl_dpo``'s widths, and the Shapes demo's
tiny LLaVA (64 image tokens, a 64-wide decoder: rows as short as their responses are long). Every layout's
log-probs and gradients are checked against ``unshared`` before it is timed; "positions" counts what the
decoder runs (rows x width, padding included), "real" the tokens that are not padding.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

import torch

from bench import run_child, synchronize

NAME = "padding_free"
LAYOUTS = {"unshared": {}, "shared": {"prefix_sharing": True},
           "packed": {"prefix_sharing": True, "padding_free": True}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("padding_free")
    g.add_argument("--pf-models", default="llava15,qwen25vl", help="comma-separated, from llava15, qwen25vl, tiny")
    g.add_argument("--pf-batch", type=int, default=2, help="B: records per step")
    g.add_argument("--pf-ks", default="0,3", help="negatives per record, comma-separated (0: a DPO step)")
    g.add_argument("--pf-words", default="4,48", help="response length range in words (min,max), drawn per response")
    g.add_argument("--pf-repeat", type=int, default=3, help="timed steps per layout (interleaved; best and median)")
    g.add_argument("--pf-capacities", default="2", help="forced bin capacities, multiples of the longest sequence "
                                                          "(comma-separated; empty: none)")


def _model(name: str):
    from bench.trl_dpo import MODELS

    spec = MODELS[name]
    if spec["kind"] == "tiny":
        from bench.forward import WORDS
        from misp.testing.tiny_llava import TinyLlavaConfig, build_tiny_llava

        model, processor = build_tiny_llava(WORDS, TinyLlavaConfig())
        side = TinyLlavaConfig().image_size
        spec = {"image_sizes": ((side, side),)}
    elif spec["kind"] == "qwen25vl":
        from misp.testing.qwen25vl import Qwen25VLSizes, build_qwen25vl

        model, processor = build_qwen25vl(Qwen25VLSizes(**spec["sizes"]), seed=0)
    else:
        from misp.testing.llava15 import Llava15Sizes, build_llava15

        model, processor = build_llava15(Llava15Sizes(**spec["sizes"]), seed=0)
    model.config.get_text_config()._attn_implementation = "sdpa"
    return model.train(), processor, spec.get("image_sizes", ((336, 336),))


def _batch(processor, image_sizes, b: int, k: int, words: tuple[int, int], seed: int):
    """The rows of a MISP-DPO step (chosen and rejected on each record's image, the chosen under K negative
    images) as ``collate_examples`` pads them, the B (K + 1) distinct images, and each row's image."""
    from PIL import Image

    from bench.trl_dpo import PROMPTS, WORDS
    from misp.models.prompting import collate_examples, encode_example, prepare_images

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = [w for w in WORDS if w not in (".", "?", ",")]

    def sentence() -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(*words))) + " ."

    def image(i: int):
        w, h = image_sizes[i % len(image_sizes)]
        return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())

    # Images 0..B-1: the records'; then each record's K negatives, distinct images as a pool's are.
    images = [image(i) for i in range(b * (k + 1))]
    examples, index = [], []
    for i in range(b):
        prompt, chosen = rng.choice(PROMPTS), sentence()
        rows = [(chosen, i), (sentence(), i)] + [(chosen, b + i * k + j) for j in range(k)]
        for text, at in rows:
            examples.append(encode_example(processor, prompt, text))
            index.append(at)
    batch = collate_examples(examples, processor.tokenizer.pad_token_id)
    return batch, prepare_images(processor, images), torch.tensor(index)


def _forced(multiple: int):
    """``choose_layout`` replaced: the shared sequences bin-packed into rows of ``multiple`` x the longest."""
    from misp.models.prefix_sharing import plan_packing

    def choose(ids, mask, labels, keys, prefix_sharing, padding_free, weight):
        longest = int(plan_packing(ids, mask, labels, keys).lengths.max())
        return plan_packing(ids, mask, labels, keys, padding_free=True, capacity=multiple * longest)

    return choose


def _step(model, batch, images, index, switches: dict, shapes: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from misp.logprobs import sequence_logps
    from misp.models import forward
    from misp.models.forward import response_logits

    switches = dict(switches)
    rule = forward.choose_layout
    if "capacity" in switches:
        forward.choose_layout = _forced(switches.pop("capacity"))
    model.zero_grad(set_to_none=True)
    handle = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                              with_kwargs=True)
    try:
        logits, labels = response_logits(model, batch["input_ids"], batch["attention_mask"], images, batch["labels"],
                                         index, **switches)
    finally:
        handle.remove()
        forward.choose_layout = rule
    logps = sequence_logps(logits, labels)
    logps.sum().backward()
    return logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def padding_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One model and K: check every layout against ``unshared``, then time them interleaved."""
    from misp.models.families.base import unwrapped
    from misp.models.forward import _image_token_id, expand_image_rows
    from misp.models.prefix_sharing import attention_pair_weight, choose_layout, layout_cost

    torch.manual_seed(cfg["seed"])
    model, processor, image_sizes = _model(cfg["model"])
    batch, images, index = _batch(processor, image_sizes, cfg["batch"], cfg["k"], tuple(cfg["words"]), cfg["seed"])
    ids, mask, labels = expand_image_rows(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          _image_token_id(model), images.tokens_per_image[index])
    weight = attention_pair_weight(unwrapped(model).config.get_text_config())
    layouts = LAYOUTS | {f"bins x{m}": {"prefix_sharing": True, "padding_free": True, "capacity": m}
                         for m in cfg.get("capacities", [])}
    keys = [(int(i),) for i in index]
    real = {}  # the tokens each layout computes that are not padding (a shared prefix once)
    for name, switches in layouts.items():
        choose = _forced(switches["capacity"]) if "capacity" in switches else choose_layout
        plan = choose(ids, mask, labels, keys, switches.get("prefix_sharing", False),
                      switches.get("padding_free", False), weight) if switches else None
        real[name] = int(mask.sum()) if plan is None else int(plan.lengths.sum())
    ref_logps, ref_grads = _step(model, batch, images, index, {}, [])
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    checks, shapes = {}, {}
    for name, switches in layouts.items():
        seen: list = []
        logps, grads = _step(model, batch, images, index, switches, seen)
        shapes[name] = seen[0]
        checks[name] = {"logps_max_abs_diff": float((logps - ref_logps).abs().max()),
                        "grad_max_rel_diff": max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()) / scale,
                        "same_params": sorted(grads) == sorted(ref_grads)}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(cfg["repeat"]):
        for name, switches in layouts.items():
            synchronize("cpu")
            t0 = time.perf_counter()
            _step(model, batch, images, index, switches, [])
            times[name].append(time.perf_counter() - t0)
    cost = {name: layout_cost(*shapes[name], weight) for name in layouts}
    return {"checks": checks, "times": times, "shapes": shapes, "real": real, "cost": cost,
            "image_tokens": sorted(set(images.tokens_per_image.tolist()))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Each model and K in a child process; speedup = unshared / layout, best step of each."""
    lo, hi = (int(x) for x in args.pf_words.split(","))
    cfg0 = {"seed": 0, "batch": args.pf_batch, "words": [lo, hi], "repeat": args.pf_repeat,
            "capacities": [int(m) for m in args.pf_capacities.split(",") if m.strip()]}
    if args.quick:
        cfg0 |= {"repeat": 1, "words": [2, 12]}
    if min(args.pf_batch, args.pf_repeat, lo) < 1 or hi < lo:
        raise ValueError("--pf-batch and --pf-repeat must be positive and --pf-words a range of positive lengths")
    rows, raw = [], {}
    for model in args.pf_models.split(","):
        for k in (int(x) for x in args.pf_ks.split(",")):
            cfg = cfg0 | {"model": model, "k": k}
            res = run_child("bench.padding_free:padding_child", cfg, args.threads)
            raw[f"{model}-k{k}"] = res
            best = {name: min(t) for name, t in res["times"].items()}
            for name in (*LAYOUTS, *(f"bins x{m}" for m in cfg0["capacities"])):
                r, w = res["shapes"][name]
                rows.append({"model": model, "k": k, "layout": name, "rows": r, "width": w, "positions": r * w,
                             "padding": 1 - res["real"][name] / (r * w), "step_s": best[name],
                             "median_s": statistics.median(res["times"][name]),
                             "speedup": best["unshared"] / best[name],
                             "predicted": res["cost"]["unshared"] / res["cost"][name],
                             "logps_diff": res["checks"][name]["logps_max_abs_diff"],
                             "grad_rel_diff": res["checks"][name]["grad_max_rel_diff"]})
    return {
        "config": cfg0 | {"models": args.pf_models, "ks": args.pf_ks},
        "raw": raw,
        "tables": [{
            "title": f"one MISP-DPO forward + backward of B = {cfg0['batch']} records' rows (chosen, rejected, K "
                     f"negatives each), responses of {cfg0['words'][0]}-{cfg0['words'][1]} words; best of "
                     f"{cfg0['repeat']} interleaved steps; speedup = unshared / layout; positions = rows x width "
                     "the decoder runs (padding share: of them, padding); predicted = the rule's cost of unshared / layout; "
                     "diffs against unshared",
            "columns": [("model", "model"), ("k", "K"), ("layout", "layout"), ("rows", "rows"), ("width", "width"),
                        ("positions", "positions"), ("padding", "padding share"), ("step_s", "best step (s)"),
                        ("median_s", "median (s)"), ("speedup", "speedup"), ("predicted", "predicted (cost model)"),
                        ("logps_diff", "max |logp diff|"),
                        ("grad_rel_diff", "max grad diff / max grad")],
            "rows": rows,
        }],
    }
