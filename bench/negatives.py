"""What K image negatives and a pool of M selected candidates cost in a MISP-DPO training step.

One ``MISPDPOModule.training_step`` (forward, backward, AdamW step) on B records: K = 0 is DPO (objective
``dpo``), K > 0 is MISP-DPO (objective ``misp``, the proposal q_phi trained on the batch's M candidate
features). Rows: 2B + BK; images: B + BK distinct. Four variants, each in its own child process:

- ``once+warm``: misp as shipped (``vlm_logits`` encodes each distinct image once) with the reference
  cache full (a later epoch in which every drawn (record, response, image) was seen before);
- ``once+cold``: the cache empty (first epoch): every row goes through the reference forward too;
- ``per-row+warm`` / ``per-row+cold``: the model's plain forward with one image per row
  (``pixel_values[image_index]``: the positive encoded twice), as most trainers do.
- ``unshared+warm`` / ``unshared+cold``: misp with prefix sharing off (``prefix_sharing=False``: the chosen
  and rejected rows each compute the image and prompt; ``once`` shares them, issue 23).

With ``--neg-trl`` the same child also steps TRL's pairwise DPO (``bench.trl_dpo.TrlContender``: its
collator, ``DPOTrainer.compute_loss``, backward, AdamW) on the same B records and model, interleaved with the
rest: the "time / TRL DPO" column.

One child holds every variant (the same two modules, the encoding switched per step, and the cache: a
filled one or a fresh empty one): the peak memory of one step per (variant, configuration) with the
allocator pinned, then timing with the allocator steady, every (variant, configuration) stepped in turn
(each K at M = 16, each M at K = 3; the order reversed on every other repeat), so every ratio compares
steps taken under the same load; the median step counts. M changes only q_phi's input ``[B, M, 4]`` (the draws themselves happen between epochs, see the
``mining`` benchmark's per-epoch drawing), so the step should be flat in M.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from typing import Any

import torch

from bench import PeakMemory, allocator_steady, mib, run_child, synchronize
from bench.trl_dpo import MODELS, build_model, make_records

NAME = "negatives"

VARIANTS = ("once+warm", "once+cold", "per-row+warm", "per-row+cold", "unshared+warm", "unshared+cold")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("negatives")
    g.add_argument("--neg-model", default="tiny", help=f"model, from {', '.join(MODELS)}")
    g.add_argument("--neg-batch", type=int, default=8, help="B: preference records per step")
    g.add_argument("--neg-ks", default="0,1,3,5,8", help="K values (negatives per record) at M = --neg-m")
    g.add_argument("--neg-m", type=int, default=16, help="M (selected candidates per record) of the K sweep")
    g.add_argument("--neg-ms", default="4,16,64,256", help="M values at K = 3")
    g.add_argument("--neg-repeat", type=int, default=9, help="timed steps per configuration")
    g.add_argument("--neg-variants", default=",".join(VARIANTS[:4]), help=f"from {', '.join(VARIANTS)}")
    g.add_argument("--neg-trl", action="store_true", help="also time TRL's pairwise DPO step (needs TRL installed)")


def _plain_logps(model, rows, images) -> torch.Tensor:
    """One image per row, through the model's own forward: the positive is encoded for both its rows (a
    LLaVA-style model, whose ``ImageInputs`` hold one ``[U, 3, H, W]`` pixel tensor)."""
    from misp.logprobs import sequence_logps
    from misp.models.forward import position_ids_from_mask

    out = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                pixel_values=images.tensors["pixel_values"][rows.image_index], position_ids=position_ids_from_mask(rows.attention_mask),
                use_cache=False)
    return sequence_logps(out.logits, rows.labels)


def _batch(module, items: list[dict[str, Any]], images: list, k: int, m: int, seed: int):
    """A MISP-DPO batch of the records with K drawn negatives out of M candidates each, and q_phi's features
    ``[B, M, 4]`` of its records (ids made unique per (K, M), so that one feature store serves every batch)."""
    from misp.batch import NegativeRef, PreferenceBatch, TokenRows
    from misp.data.pixel_cache import image_inputs
    from misp.models.prompting import collate_examples

    b = len(items)
    pad = module.processor.tokenizer.pad_token_id
    c = collate_examples([it["chosen"] for it in items], pad)
    r = collate_examples([it["rejected"] for it in items], pad)
    gen = torch.Generator().manual_seed(seed)
    draw_index = torch.randint(0, m, (b, k), generator=gen)
    negatives = [images[(i * 7 + int(j)) % len(images)] for i in range(b) for j in draw_index[i]]
    batch = PreferenceBatch(
        ids=[f"k{k}m{m}-{it['id']}" for it in items],
        chosen=TokenRows(c["input_ids"], c["attention_mask"], c["labels"]),
        rejected=TokenRows(r["input_ids"], r["attention_mask"], r["labels"]),
        images=image_inputs(module.processor, [it["image"] for it in items] + negatives),
        negatives=[[NegativeRef("sae", f"pool/{int(j)}", int(j)) for j in draw_index[i]] for i in range(b)],
        log_q=torch.full((b, k), -math.log(m)),
        draw_index=draw_index,
    )
    return batch, torch.rand(b, m, 4, generator=gen)


def negatives_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child: every variant and (K, M); peak memory of each, then interleaved timing of all of them."""
    from misp.data.handshake import DataDescription, NegativesDescription, ProposalFeatures
    from misp.dpo.batching import concatenate_rows
    from misp.dpo.method import Method
    from misp.dpo.module import MISPDPOModule
    from misp.dpo.reference import ReferenceCache
    from misp.models.prompting import encode_example
    from misp.models.vlm import VLMSpec
    from misp.negatives.spec import Negatives

    torch.manual_seed(0)
    trl = None
    with tempfile.TemporaryDirectory(prefix="misp-bench-neg-") as tmp:
        build_model(cfg["model"], f"{tmp}/model")
        modules = {loss: MISPDPOModule(VLMSpec(path=f"{tmp}/model"), method=Method.preset(loss))
                   for loss in ("dpo", "misp_dpo")}
        processor = modules["dpo"].processor
        side = int((processor.image_processor.crop_size or {}).get("height", 64))
        records = make_records(cfg["batch"] + 64, 24, side, cfg["seed"])
        if cfg.get("trl"):
            from bench.trl_dpo import TrlContender

            trl = TrlContender(f"{tmp}/model", records[: cfg["batch"]], gradient_checkpointing=False, out_dir=f"{tmp}/trl")
    for module in modules.values():
        module.train()
    pool = [r["image"] for r in records[cfg["batch"]:]]
    items = [{"id": r["id"], "image": r["image"], "chosen": encode_example(processor, r["prompt"], r["chosen"]),
              "rejected": encode_example(processor, r["prompt"], r["rejected"])} for r in records[: cfg["batch"]]]
    configs = [(k, cfg["m"]) for k in cfg["ks"]]
    configs += [(3, m) for m in cfg["ms"] if (3, m) not in configs]
    batches, warm_caches, features = {}, {}, {}
    for k, m in configs:
        batches[(k, m)], features[(k, m)] = _batch(modules["dpo"], items, pool, k, m, cfg["seed"])
    # q_phi's features reach the module by the handshake, by record, as NegativeSamplerDataModule hands them;
    # M differs between configurations, so the store handed over is the one of the batch being stepped.
    stores = {c: ProposalFeatures(f, torch.ones(f.shape[:2], dtype=torch.bool), {rid: i for i, rid in enumerate(batches[c].ids)})
              for c, f in features.items()}
    current = [configs[0]]
    modules["misp_dpo"].attach_data(DataDescription(negatives=NegativesDescription(lambda: stores[current[0]])))
    for k, m in configs:
        current[0] = (k, m)
        module = modules["misp_dpo" if k else "dpo"]
        batch = batches[(k, m)]
        # A full cache for this batch (a later epoch): the reference log-probs of every row, computed once.
        module.reference_cache = warm_caches[(k, m)] = ReferenceCache()
        module._reference_logps(batch, concatenate_rows(batch, processor.tokenizer.pad_token_id))
    optimizers = {loss: torch.optim.AdamW([p for p in mod.parameters() if p.requires_grad], lr=1e-6)
                  for loss, mod in modules.items()}
    keys = [(v, c) for v in cfg["variants"] for c in configs]
    if trl is not None:
        keys.append(("trl", (0, cfg["m"])))

    def step(key: tuple[str, tuple[int, int]]) -> None:
        variant, (k, m) = key
        if variant == "trl":
            trl.step(list(range(cfg["batch"])))
            return
        encoding, cache = variant.split("+")
        loss_name = "misp_dpo" if k else "dpo"
        module = modules[loss_name]
        if encoding == "per-row":
            module._logps = _plain_logps  # an instance attribute shadows the method
        else:
            module.__dict__.pop("_logps", None)
        module.hparams["prefix_sharing"] = encoding == "once"
        module.hparams["padding_free"] = encoding == "once"  # unshared: no packing at all
        # Cold: an empty cache (the first epoch), refilled by this step and dropped; warm: the full one.
        module.reference_cache = warm_caches[(k, m)] if cache == "warm" else ReferenceCache()
        current[0] = (k, m)
        if k:  # the method at this configuration's K (K has one home, the module's method)
            module.method.negatives = Negatives("sae", k)
        loss = module.training_step(batches[(k, m)], 0)
        loss.backward()
        optimizers[loss_name].step()
        optimizers[loss_name].zero_grad(set_to_none=True)

    res: dict[str, Any] = {"configs": {}}
    for key in keys:  # warm-up (optimizer state, first calls), then peak memory
        step(key)
    for key in keys:
        with PeakMemory(cfg["device"]) as mem:
            step(key)
        variant, (k, m) = key
        res["configs"][f"{variant},{k},{m}"] = {
            "variant": variant, "k": k, "m": m, "peak_bytes": mem.peak_bytes, "rows": 2 * cfg["batch"] + cfg["batch"] * k,
            "images": len(batches[(k, m)].images) if variant != "trl" else 2 * cfg["batch"]}
    res["memory_method"] = mem.method
    allocator_steady()
    for key in keys:
        step(key)
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for rep in range(cfg["repeat"]):
        for key in keys if rep % 2 == 0 else keys[::-1]:
            synchronize(cfg["device"])
            t0 = time.perf_counter()
            step(key)
            synchronize(cfg["device"])
            times[key].append(time.perf_counter() - t0)
    for (variant, (k, m)), ts in times.items():
        entry = res["configs"][f"{variant},{k},{m}"]
        entry["times"] = ts
        entry["median_s"] = statistics.median(ts)
    res["params"] = sum(p.numel() for p in modules["dpo"].model.parameters())
    return res


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from e
    if not values or min(values) < 0:
        raise ValueError(f"{what} must be non-negative integers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One child for everything; tables of step time and peak relative to K = 0 (DPO), and over M at K = 3."""
    ks, ms = _ints(args.neg_ks, "--neg-ks"), _ints(args.neg_ms, "--neg-ms")
    if 0 not in ks:
        ks = [0, *ks]  # the DPO step every ratio is against
    if min(ms) < 1 or args.neg_m < 1:
        raise ValueError("M values must be positive")
    variants = [v.strip() for v in args.neg_variants.split(",") if v.strip()]
    if any(v not in VARIANTS for v in variants) or args.neg_model not in MODELS:
        raise ValueError(f"--neg-variants from {VARIANTS}, --neg-model from {list(MODELS)}")
    base = {"device": args.device, "seed": 0, "model": args.neg_model, "batch": args.neg_batch,
            "ks": ks, "m": args.neg_m, "ms": ms, "repeat": args.neg_repeat, "trl": args.neg_trl}
    if args.quick:
        base |= {"batch": 2, "ks": [0, 3], "ms": [4, 16], "repeat": 1}
    res = run_child("bench.negatives:negatives_child", {**base, "variants": variants}, args.threads)
    c = res["configs"]
    k_rows, m_rows = [], []
    shipped = "once+warm" if "once+warm" in variants else None
    for v in variants:
        dpo = c[f"{v},0,{base['m']}"]
        for k in base["ks"]:
            e = c[f"{v},{k},{base['m']}"]
            row = {"variant": v, "k": k, "rows": e["rows"], "images": e["images"], "step_s": e["median_s"],
                   "time_ratio": e["median_s"] / dpo["median_s"], "peak_mib": mib(e["peak_bytes"]),
                   "peak_ratio": e["peak_bytes"] / max(dpo["peak_bytes"], 1)}
            if shipped is not None:
                row["vs_shipped_dpo"] = e["median_s"] / c[f"{shipped},0,{base['m']}"]["median_s"]
            if base["trl"]:
                row["vs_trl_dpo"] = e["median_s"] / c[f"trl,0,{base['m']}"]["median_s"]
                # per repeat (same load): this step over TRL's step of the same repeat
                ratios = [a / b for a, b in zip(e["times"], c[f"trl,0,{base['m']}"]["times"], strict=True)]
                row["vs_trl_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
            k_rows.append(row)
        m0 = c[f"{v},3,{min(base['ms'])}"]
        for m in base["ms"]:
            e = c[f"{v},3,{m}"]
            m_rows.append({"variant": v, "m": m, "step_s": e["median_s"], "time_ratio": e["median_s"] / m0["median_s"],
                           "peak_mib": mib(e["peak_bytes"]), "peak_ratio": e["peak_bytes"] / max(m0["peak_bytes"], 1)})
    params = res["params"]
    head = (f"{base['model']} LLaVA ({params / 1e6:.2f}M params), B={base['batch']}, one training step "
            f"(forward, backward, AdamW); median of {base['repeat']} interleaved steps")
    return {
        "config": base | {"variants": variants},
        "tables": [
            {"title": f"Cost of K negatives at M={base['m']}: {head}; ratios against K=0 (DPO) of the same variant",
             "columns": [("variant", "variant (encoding + reference cache)"), ("k", "K"), ("rows", "rows"),
                         ("images", "images"), ("step_s", "step (s)"), ("time_ratio", "time / DPO"),
                         ("vs_shipped_dpo", "time / DPO once+warm"), ("vs_trl_dpo", "time / TRL DPO"),
                         ("vs_trl_range", "per-repeat range"), ("peak_mib", "peak (MiB)"),
                         ("peak_ratio", "peak / DPO")],
             "rows": k_rows},
            {"title": f"Pool size M at K=3: {head}; ratios against the smallest M",
             "columns": [("variant", "variant"), ("m", "M"), ("step_s", "step (s)"), ("time_ratio", "time ratio"),
                         ("peak_mib", "peak (MiB)"), ("peak_ratio", "peak ratio")],
             "rows": m_rows},
        ],
        "raw": res,
    }
