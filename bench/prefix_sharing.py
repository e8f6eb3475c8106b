"""Prefix sharing for a DPO pair on LLaVA-1.5 geometry: which mechanism, measured (issue 23's first step).

A preference pair's chosen and rejected rows share the image and the prompt (576 image tokens and the
prompt on LLaVA-1.5) and differ only in a response of a few dozen tokens. Three ways to run one step
(forward + backward of the summed response log-probs of both rows), compared side by side:

- ``unshared`` (misp today): two rows ``[prefix, chosen]`` and ``[prefix, rejected]``, right-padded, the
  image encoded once (``misp.models.forward.response_logits``), the prefix computed twice.
- ``mask``: one packed row ``[prefix, chosen, rejected]`` per pair with a block attention mask (each
  response sees the prefix and itself, not the other response) and position ids that restart after the
  prefix for the rejected response; SDPA with an explicit 4-D boolean mask.
- ``kv``: the prefix runs once with a cache; its keys and values are repeated for the two responses, which
  run as a batch of two rows after it; gradients flow back through the cached keys and values.

The logit that predicts a response's first token sits at the prefix's last position, which the two rows
share; both shared mechanisms gather each response token's logit from where it was computed. Every
variant's log-probs and parameter gradients are checked against ``unshared`` before it is timed.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from typing import Any

import torch

from bench import run_child, synchronize

NAME = "prefix_sharing"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("prefix_sharing")
    g.add_argument("--prefix-batch", type=int, default=2, help="preference pairs per step")
    g.add_argument("--prefix-prompt", type=int, default=70, help="prompt tokens beside the 576 image tokens")
    g.add_argument("--prefix-response", type=int, default=40, help="tokens per response (rejected: 8 fewer)")
    g.add_argument("--prefix-width", type=int, default=512, help="decoder width (7B: 4096)")
    g.add_argument("--prefix-layers", type=int, default=4, help="decoder layers")
    g.add_argument("--prefix-repeat", type=int, default=3, help="timed steps per variant (best counts)")


def _model(width: int, layers: int, seed: int, image_size: int = 336):
    from misp.models.llava15 import Llava15Sizes, build_llava15

    sizes = Llava15Sizes(image_size=image_size, vision_hidden_size=128, vision_intermediate_size=512, vision_layers=2, vision_heads=2,
                         text_hidden_size=width, text_intermediate_size=int(width * 2.6875) // 64 * 64,
                         text_layers=layers, text_heads=max(1, width // 64), vocab_size=32064)
    model, processor = build_llava15(sizes, seed=seed)
    model.config.text_config._attn_implementation = "sdpa"
    return model.train(), processor, sizes


def _pairs(processor, sizes, batch: int, prompt: int, response: int, seed: int) -> list[dict[str, torch.Tensor]]:
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.arange(3, tok.vocab_size)  # no special tokens inside texts

    def words(n: int) -> torch.Tensor:
        return ordinary[torch.randint(len(ordinary), (n,), generator=g)]

    pairs = []
    for _ in range(batch):
        prefix = torch.cat([torch.tensor([tok.bos_token_id]), torch.full((sizes.num_image_tokens,), image_id),
                            words(prompt)])
        pairs.append({"prefix": prefix, "chosen": words(response), "rejected": words(max(1, response - 8))})
    return pairs


def _token_logps(logits_at: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of ``targets [n]`` from the logits that predict them ``[n, V]``."""
    return torch.log_softmax(logits_at.float(), -1).gather(-1, targets[:, None]).sum()


def unshared(model, pairs, pixel_values) -> torch.Tensor:
    """misp's path today: 2B rows, right-padded, each image encoded once."""
    from misp.logprobs import sequence_logps
    from misp.models.forward import response_logits

    rows, labels = [], []
    for part in ("chosen", "rejected"):
        for p in pairs:
            rows.append(torch.cat([p["prefix"], p[part]]))
            labels.append(torch.cat([torch.full_like(p["prefix"], -100), p[part]]))
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)], mask[i, : len(r)], lab[i, : len(la)] = r, 1, la
    b = len(pairs)
    index = torch.cat([torch.arange(b), torch.arange(b)])
    logits, lab = response_logits(model, ids, mask, pixel_values, lab, index)
    logps = sequence_logps(logits, lab)
    return torch.stack([logps[:b], logps[b:]], -1)  # [B, 2]: chosen, rejected


def packed_mask(model, pairs, pixel_values) -> torch.Tensor:
    """One row [prefix, chosen, rejected] per pair with a block mask and restarted positions."""
    segs = [(len(p["prefix"]), len(p["chosen"]), len(p["rejected"])) for p in pairs]
    length = max(a + c + r for a, c, r in segs)
    b = len(pairs)
    ids = torch.zeros(b, length, dtype=torch.long)
    allow = torch.zeros(b, 1, length, length, dtype=torch.bool)
    pos = torch.zeros(b, length, dtype=torch.long)
    for i, (p, (a, c, r)) in enumerate(zip(pairs, segs, strict=True)):
        ids[i, : a + c + r] = torch.cat([p["prefix"], p["chosen"], p["rejected"]])
        causal = torch.ones(a + c + r, a + c + r, dtype=torch.bool).tril()
        causal[a + c :, a : a + c] = False  # the rejected response does not see the chosen one
        allow[i, 0, : a + c + r, : a + c + r] = causal
        allow[i, 0, a + c + r :, 0] = True  # padding rows attend somewhere (no NaN); never read
        pos[i, : a + c + r] = torch.cat([torch.arange(a + c), torch.arange(a, a + r)])
    first = min(a for a, _, _ in segs) - 1
    out = model(input_ids=ids, attention_mask=allow, pixel_values=pixel_values, position_ids=pos,
                use_cache=False, logits_to_keep=length - first)
    logits = out.logits  # positions first .. length-1
    result = []
    for i, (p, (a, c, r)) in enumerate(zip(pairs, segs, strict=True)):
        row = logits[i]
        chosen = _token_logps(row[torch.arange(a - 1, a + c - 1) - first], p["chosen"])
        rejected_at = torch.cat([torch.tensor([a - 1]), torch.arange(a + c, a + c + r - 1)]) - first
        rejected = _token_logps(row[rejected_at], p["rejected"])
        result.append(torch.stack([chosen, rejected]))
    return torch.stack(result)


def kv_reuse(model, pairs, pixel_values) -> torch.Tensor:
    """The prefix once with a cache, then both responses after its repeated keys and values."""
    lengths = {len(p["prefix"]) for p in pairs}
    if len(lengths) != 1:
        raise ValueError("kv_reuse in this benchmark takes prefixes of one length")
    (a,) = lengths
    b = len(pairs)
    prefix = torch.stack([p["prefix"] for p in pairs])
    out = model(input_ids=prefix, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    last = out.logits[:, -1]  # [B, V]: predicts each response's first token
    cache.batch_repeat_interleave(2)  # row 2i: chosen of pair i, 2i+1: rejected
    responses = [p[part] for p in pairs for part in ("chosen", "rejected")]
    r_len = max(len(r) for r in responses)
    ids = torch.zeros(2 * b, r_len, dtype=torch.long)
    mask = torch.zeros(2 * b, a + r_len, dtype=torch.long)
    for i, r in enumerate(responses):
        ids[i, : len(r)] = r
        mask[i, : a + len(r)] = 1
    pos = (a + torch.arange(r_len)).expand(2 * b, r_len)
    # transformers renamed past_key_values to cache in 5.2x; 5.17 knows only the old name.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg: cache}).logits
    result = []
    for i, r in enumerate(responses):
        lp = _token_logps(last[i // 2][None], r[:1])
        if len(r) > 1:
            lp = lp + _token_logps(logits[i, : len(r) - 1], r[1:])
        result.append(lp)
    return torch.stack(result).reshape(b, 2)


VARIANTS = {"unshared": unshared, "mask": packed_mask, "kv": kv_reuse}


def _step(model, fn, pairs, pixel_values) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logps = fn(model, pairs, pixel_values)
    logps.sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def prefix_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check every variant against ``unshared``, then time them interleaved."""
    torch.manual_seed(cfg["seed"])
    model, processor, sizes = _model(cfg["width"], cfg["layers"], cfg["seed"], cfg.get("image_size", 336))
    pairs = _pairs(processor, sizes, cfg["batch"], cfg["prompt"], cfg["response"], cfg["seed"])
    pixel_values = torch.randn(cfg["batch"], 3, sizes.image_size, sizes.image_size)
    ref_logps, ref_grads = _step(model, unshared, pairs, pixel_values)
    checks = {}
    for name in ("mask", "kv"):
        logps, grads = _step(model, VARIANTS[name], pairs, pixel_values)
        # Relative to the largest gradient entry of the model: some gradients are zero in exact arithmetic
        # (a key bias under softmax) and hold only rounding noise, which no per-tensor scale can judge.
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        worst = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items()) / scale
        checks[name] = {"logps_max_abs_diff": float((logps - ref_logps).abs().max()),
                        "logps_scale": float(ref_logps.abs().max()), "grad_max_rel_diff": worst,
                        "same_params": sorted(grads) == sorted(ref_grads)}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(cfg["repeat"]):
        for name, fn in VARIANTS.items():
            synchronize("cpu")
            t0 = time.perf_counter()
            _step(model, fn, pairs, pixel_values)
            times[name].append(time.perf_counter() - t0)
    tokens = {"image": sizes.num_image_tokens, "prefix": len(pairs[0]["prefix"]), "chosen": len(pairs[0]["chosen"]),
              "rejected": len(pairs[0]["rejected"])}
    return {"checks": checks, "times": times, "tokens": tokens}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a child process; the ratios are unshared / variant, best step of each."""
    cfg = {"seed": 0, "batch": args.prefix_batch, "prompt": args.prefix_prompt, "response": args.prefix_response,
           "width": args.prefix_width, "layers": args.prefix_layers, "repeat": args.prefix_repeat}
    if args.quick:
        cfg |= {"width": 64, "layers": 1, "repeat": 1, "prompt": 8, "response": 12, "image_size": 112}
    if min(cfg["batch"], cfg["prompt"], cfg["response"], cfg["width"], cfg["layers"], cfg["repeat"]) < 1:
        raise ValueError("every --prefix-* size must be positive")
    res = run_child("bench.prefix_sharing:prefix_child", cfg, args.threads)
    best = {name: min(t) for name, t in res["times"].items()}
    rows = [{"variant": name, "step_s": best[name], "speedup": best["unshared"] / best[name],
             "median_s": statistics.median(res["times"][name]),
             **({"logps_diff": res["checks"][name]["logps_max_abs_diff"],
                 "grad_rel_diff": res["checks"][name]["grad_max_rel_diff"]} if name in res["checks"] else {})}
            for name in VARIANTS]
    t = res["tokens"]
    return {
        "config": cfg,
        "raw": res,
        "tables": [{
            "title": f"one DPO step (forward + backward), {cfg['batch']} pairs, prefix {t['prefix']} tokens "
                     f"({t['image']} image), responses {t['chosen']} / {t['rejected']}; decoder width {cfg['width']}, "
                     f"{cfg['layers']} layers, vocab 32064; best of {cfg['repeat']} interleaved steps; "
                     "speedup = unshared / variant; diffs against unshared",
            "columns": [("variant", "variant"), ("step_s", "best step (s)"), ("median_s", "median (s)"),
                        ("speedup", "speedup"), ("logps_diff", "max |logp diff|"),
                        ("grad_rel_diff", "max grad diff / max grad")],
            "rows": rows,
        }],
    }
