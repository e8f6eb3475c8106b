"""misp's pairwise DPO step against TRL's ``DPOTrainer`` on the same VLM, records, batch and optimizer.

Models: the tiny Shapes LLaVA, LLaVA-1.5 and Qwen2.5-VL (M-RoPE, dynamic resolution: each batch mixes
images of two sizes, so of two token counts) at a width two CPU cores step through in seconds.

What a user compares when picking a trainer: samples per second and peak memory of one training step,
data collation included, for plain DPO (chosen and rejected on the positive image, no image negatives).

- misp: the records are tokenised once, as ``NegativeSamplerDataModule`` does at setup; per step its
  ``collate_preferences`` pads them and preprocesses the B images, then ``MISPDPOModule.training_step`` (objective
  ``dpo``: each image encoded once, ``sequence_logps``, the reference through ``ReferenceCache``), backward
  and the optimizer step. Two contenders: the reference cache **cold** (emptied before every step: the
  first epoch, every reference log-prob computed) and **warm** (filled by one untimed epoch: later epochs,
  no reference forward at all).
- TRL: ``trl.DPOTrainer`` built as its documentation shows for a vision-language model (a
  the model's processor as ``processing_class``, a dataset of ``prompt``/``chosen``/``rejected``/``images``), its
  reference a live frozen copy (TRL refuses ``precompute_ref_log_probs`` for vision data). Per step its
  ``DataCollatorForVisionPreference`` tokenises and preprocesses the batch (each image twice: once for
  the chosen and once for the rejected row), then ``DPOTrainer.compute_loss`` (policy and reference
  forwards, its fused LM head), backward and the optimizer step. Gradient checkpointing off, as misp; the
  contender ``trl-defaults`` keeps ``DPOConfig``'s default (on).

Both sides: float32, the same weights (loaded from one folder), the same AdamW (torch's, lr 1e-6, no
weight decay), beta 0.1, sigmoid loss, no truncation. Neither trainer's outer loop (Lightning's or
``transformers.Trainer``'s) is timed: their per-step overhead is logging and bookkeeping, the same for
both orders of magnitude smaller than a step here.

Checks before timing: the two sides' reference log-probs of the first batch (summed over the response
tokens) must agree to ``1e-3`` relative, and TRL's sequences must hold the same tokens as misp's.

Timing: one child process per model holds every contender; repeats of ``--trl-steps`` steps each run the
contenders in turn (order reversed on every other repeat), so each ratio compares steps taken under the
same machine load. Memory: one fresh child per contender, the peak resident set of ``--trl-steps`` steps
on top of what was live before them (model, reference, optimizer state after one warm-up step, records);
see ``bench.PeakMemory``. The child of a misp contender never imports TRL.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch
from PIL import Image

from bench import PeakMemory, allocator_steady, mib, run_child, synchronize
from bench.forward import WORDS

NAME = "trl_dpo"

CONTENDERS = ("misp-cold", "misp-warm", "trl", "trl-defaults", "misp-cold-all-logits", "misp-cold-ckpt",
              "misp-warm-ckpt", "misp-cold-unshared", "misp-warm-unshared")
"""misp with its reference cache empty / full; TRL with gradient checkpointing off / at its default (on);
misp cold with the LM head on every position (misp before ``response_logits``), for the record; misp
with gradient checkpointing (``VLMSpec.gradient_checkpointing``), to compare with TRL's default; misp
with prefix sharing off (``MISPDPOModule(prefix_sharing=False)``: chosen and rejected rows each compute
the image and prompt), the misp of before issue 23."""

MODELS: dict[str, dict[str, Any]] = {
    # The Shapes demo's tiny LLaVA (configs/shapes: TinyLlavaConfig defaults): 64 px, 64 image tokens.
    "tiny": {"kind": "tiny"},
    # The real LLaVA-1.5 architecture (CLIP ViT at 336 px / 14 px patches: 576 image tokens, Llama decoder,
    # BPE tokenizer) at a width two CPU cores step through in seconds; random weights.
    "llava15": {"kind": "llava15", "sizes": dict(vision_hidden_size=256, vision_intermediate_size=1024,
                                                 vision_heads=4, vision_layers=2, text_hidden_size=256,
                                                 text_intermediate_size=704, text_heads=4, text_layers=2)},
    # The real Qwen2.5-VL architecture (windowed ViT with 14 px patches and a 2x2 merger, Qwen2 decoder with
    # grouped-query attention and M-RoPE, byte-level BPE, the hub's chat template) at the same widths, with
    # configs/qwen25vl.yaml's pixel bounds; images alternate 448x448 and 560x448 (256 and 320 image tokens),
    # so every batch mixes two image sizes as dynamic resolution does; random weights.
    "qwen25vl": {"kind": "qwen25vl", "sizes": dict(vision_hidden_size=256, vision_intermediate_size=704,
                                                   vision_heads=4, vision_layers=2, text_hidden_size=256,
                                                   text_intermediate_size=704, text_heads=4, text_kv_heads=2,
                                                   text_layers=2, min_pixels=256 * 28 * 28,
                                                   max_pixels=1280 * 28 * 28),
                 "image_sizes": ((448, 448), (560, 448))},
}
BETA = 0.1
LR = 1e-6
PROMPTS = ("describe what you see in the image .", "what is in the image ?", "describe the image .")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("trl")
    g.add_argument("--trl-models", default="tiny,llava15,qwen25vl", help=f"comma-separated, from {', '.join(MODELS)}")
    g.add_argument("--trl-batch", type=int, default=8, help="B: preference records per step")
    g.add_argument("--trl-steps", type=int, default=3, help="steps per contender per repeat (distinct batches)")
    g.add_argument("--trl-repeats", type=int, default=3, help="alternating repeats; ratios are their median")
    g.add_argument("--trl-words", type=int, default=24, help="words in each chosen/rejected response")
    g.add_argument("--trl-contenders", default=",".join(CONTENDERS[:4]), help=f"from {', '.join(CONTENDERS)}")


# ------------------------------------------------------------------------------------------------------
# shared by both sides


def build_model(name: str, out_dir: str) -> None:
    """Build model ``name`` (seed 0) and save it with its processor to ``out_dir`` (misp's ``save_vlm``)."""
    from misp.models.vlm import save_vlm

    spec = MODELS[name]
    if spec["kind"] == "tiny":
        from misp.testing.tiny_llava import TinyLlavaConfig, build_tiny_llava

        model, processor = build_tiny_llava(WORDS, TinyLlavaConfig())
    elif spec["kind"] == "qwen25vl":
        from misp.testing.qwen25vl import Qwen25VLSizes, build_qwen25vl

        model, processor = build_qwen25vl(Qwen25VLSizes(**spec["sizes"]), seed=0)
    else:
        from misp.testing.llava15 import Llava15Sizes, build_llava15

        model, processor = build_llava15(Llava15Sizes(**spec["sizes"]), seed=0)
    save_vlm(model, processor, out_dir)


def make_records(n: int, words: int, image_sizes: int | tuple[tuple[int, int], ...], seed: int) -> list[dict[str, Any]]:
    """``n`` preference records: prompt, chosen and rejected text of ``words`` words, one RGB image (record i's
    ``image_sizes[i % len(image_sizes)]``, width by height; an int is one square side)."""
    if isinstance(image_sizes, int):
        image_sizes = ((image_sizes, image_sizes),)
    rng = random.Random(seed)
    vocab = [w for w in WORDS if w not in (".", "?", ",")]
    gen = torch.Generator().manual_seed(seed)

    def sentence() -> str:
        return " ".join(rng.choice(vocab) for _ in range(words)) + " ."

    records = []
    for i in range(n):
        width, height = image_sizes[i % len(image_sizes)]
        pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
        records.append({"id": f"r{i}", "prompt": rng.choice(PROMPTS), "chosen": sentence(),
                        "rejected": sentence(), "image": Image.fromarray(pixels.numpy())})
    return records


def _image_sizes(model: str, processor) -> tuple[tuple[int, int], ...]:
    """The model's benchmark image sizes: its own (dynamic resolution), else the processor's square crop."""
    if "image_sizes" in MODELS[model]:
        return MODELS[model]["image_sizes"]
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    side = int(crop.get("height", 64))
    return ((side, side),)


# ------------------------------------------------------------------------------------------------------
# misp


class MispContender:
    """misp's DPO step: ``collate_preferences`` then ``MISPDPOModule.training_step``, backward, AdamW."""

    def __init__(self, model_dir: str, records: list[dict[str, Any]], warm: bool, all_logits: bool = False,
                 checkpointing: bool = False, prefix_sharing: bool = True) -> None:
        from misp.dpo.method import Method
        from misp.dpo.module import MISPDPOModule
        from misp.models.prompting import encode_example
        from misp.models.vlm import VLMSpec

        self.module = MISPDPOModule(VLMSpec(path=model_dir, gradient_checkpointing=checkpointing),
                                    method=Method.preset("dpo", beta=BETA),
                                    cache_reference=True, prefix_sharing=prefix_sharing,
                                    padding_free=prefix_sharing)  # off: no packing at all, misp before issue 23
        self.module.train()
        if checkpointing and not getattr(self.module.model, "is_gradient_checkpointing", False):
            raise RuntimeError("VLMSpec.gradient_checkpointing did not switch checkpointing on")
        self.processor = self.module.processor
        self.warm = warm
        if all_logits:
            self.module._logps = _all_position_logps  # an instance attribute shadows the method
        # Tokenised once, as NegativeSamplerDataModule.setup does with encode_preference_records.
        self.items = [{
            "id": r["id"], "chosen": encode_example(self.processor, r["prompt"], r["chosen"]),
            "rejected": encode_example(self.processor, r["prompt"], r["rejected"]), "positive": r["image"],
            "negatives": [], "refs": [], "log_q": torch.zeros(0), "draw_index": torch.zeros(0, dtype=torch.long),
        } for r in records]
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def collate(self, indices: list[int]):
        from misp.data.collate import collate_preferences

        return collate_preferences([self.items[i] for i in indices], self.processor)

    def step(self, indices: list[int]) -> None:
        if not self.warm:
            self.module.reference_cache.values.clear()  # cold: the first epoch, nothing cached yet
        batch = self.collate(indices)
        loss = self.module.training_step(batch, 0)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fill_cache(self, batches: list[list[int]]) -> None:
        """One untimed epoch of reference forwards: afterwards every step finds its reference log-probs."""
        from misp.dpo.batching import concatenate_rows

        for indices in batches:
            batch = self.collate(indices)
            rows = concatenate_rows(batch, self.processor.tokenizer.pad_token_id)
            self.module._reference_logps(batch, rows)

    @torch.no_grad()
    def reference_logps(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Reference log-probs of chosen and rejected, and each row's tokens (for the check against TRL)."""
        from misp.dpo.batching import concatenate_rows

        batch = self.collate(indices)
        from misp.models.forward import _as_image_inputs, _image_token_id, expand_image_rows

        rows = concatenate_rows(batch, self.processor.tokenizer.pad_token_id)
        logps = self.module._logps(self.module.reference, rows, batch.images)
        b = len(indices)
        # The rows as the model sees them: a dynamic-resolution family's one placeholder per row expanded
        # into its image's tokens (TRL's processor call expands them when it tokenises).
        image_id = _image_token_id(self.module.reference)
        images = _as_image_inputs(batch.images, rows.input_ids, image_id)
        per_row = images.tokens_per_image[rows.image_index.to(images.tokens_per_image.device)]
        ids, mask, _ = expand_image_rows(rows.input_ids, rows.attention_mask, None, image_id, per_row)
        tokens = [r[m.bool()].tolist() for r, m in zip(ids, mask, strict=True)]
        return logps[:b], logps[b : 2 * b], tokens


# ------------------------------------------------------------------------------------------------------
# TRL


def _trl_prompt_prefix(processor, prompt: str) -> str:
    """The text in front of the templated prompt that makes TRL's tokenisation match misp's ids.

    TRL's collator tokenises with ``add_special_tokens=False``, so BOS must be in the text; whether a space
    must follow it depends on the tokenizer (sentencepiece's prefix space).
    """
    from misp.models.prompting import format_prompt

    tok = processor.tokenizer
    text = format_prompt(prompt, processor)
    want = list(tok(text, add_special_tokens=True)["input_ids"])
    for prefix in (tok.bos_token or "", (tok.bos_token or "") + " ", ""):
        if list(tok(prefix + text, add_special_tokens=False)["input_ids"]) == want:
            return prefix
    raise RuntimeError("no BOS spelling makes TRL's prompt tokens equal misp's")


class TrlContender:
    """TRL's DPO step: ``DataCollatorForVisionPreference``, then ``DPOTrainer.compute_loss``, backward, AdamW."""

    def __init__(self, model_dir: str, records: list[dict[str, Any]], gradient_checkpointing: bool, out_dir: str) -> None:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from misp.models.families import family_for_processor
        from misp.models.prompting import format_prompt
        from misp.models.vlm import VLMSpec, load_vlm

        model, processor = load_vlm(VLMSpec(path=model_dir))
        model.train()
        prefix = _trl_prompt_prefix(processor, records[0]["prompt"])
        eos = processor.tokenizer.eos_token
        sep = family_for_processor(processor).response_separator
        # Plain-text (not conversational) examples holding the model's template as misp writes it (LLaVA-1.5's,
        # or the processor's chat template with its system message), so that the tokens are exactly misp's
        # (checked); TRL's processor call expands the image placeholder into each image's tokens.
        self.examples = [{"prompt": prefix + format_prompt(r["prompt"], processor), "chosen": sep + r["chosen"] + eos,
                          "rejected": sep + r["rejected"] + eos, "images": [r["image"]]} for r in records]
        args = DPOConfig(
            output_dir=out_dir, per_device_train_batch_size=len(records), beta=BETA, loss_type=["sigmoid"],
            learning_rate=LR, weight_decay=0.0, gradient_checkpointing=gradient_checkpointing,
            bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), max_length=None,
            report_to="none", logging_steps=10**9, save_strategy="no", precompute_ref_log_probs=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.trainer = DPOTrainer(model=model, ref_model=None, args=args, processing_class=processor,
                                      train_dataset=Dataset.from_list(self.examples[:2]))
        self.model = self.trainer.model
        if args.activation_checkpointing:  # gradient_checkpointing's new name
            # transformers.Trainer switches it on in train(), which this benchmark does not call: as it does.
            kwargs = dict(args.activation_checkpointing_kwargs or {})
            kwargs.pop("every_n_layers", None), kwargs.pop("offload", None)
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None)
        self.checkpointing = bool(getattr(self.model, "is_gradient_checkpointing", False))
        if self.checkpointing != gradient_checkpointing:
            raise RuntimeError(f"TRL's model has gradient checkpointing {self.checkpointing}, asked {gradient_checkpointing}")
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)

    def collate(self, indices: list[int]) -> dict:
        # The collator edits its examples in place (image -> images, message formatting): hand it copies.
        batch = self.trainer.data_collator([copy.copy(self.examples[i]) for i in indices])
        device = self.trainer.accelerator.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def step(self, indices: list[int]) -> None:
        loss = self.trainer.compute_loss(self.model, self.collate(indices))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def reference_logps(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        batch = self.collate(indices)
        chosen, rejected = self.trainer.compute_ref_log_probs(self.trainer.ref_model, batch)
        tokens = [ids[m.bool()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
        return chosen, rejected, tokens


def _all_position_logps(model, rows, pixel_values: torch.Tensor) -> torch.Tensor:
    """misp's log-probs as before ``response_logits``: the LM head on every position, image tokens included."""
    from misp.logprobs import sequence_logps
    from misp.models.forward import vlm_logits

    logits = vlm_logits(model, rows.input_ids, rows.attention_mask, pixel_values, rows.image_index)
    return sequence_logps(logits, rows.labels)


def make_contender(name: str, model_dir: str, records: list[dict[str, Any]], tmp: str):
    if name.startswith("misp"):
        return MispContender(model_dir, records, warm=name.startswith("misp-warm"), all_logits=name.endswith("all-logits"),
                             checkpointing=name.endswith("-ckpt"), prefix_sharing=not name.endswith("-unshared"))
    return TrlContender(model_dir, records, gradient_checkpointing=name == "trl-defaults", out_dir=tmp)


def _batches(n_records: int, b: int) -> list[list[int]]:
    return [list(range(s, s + b)) for s in range(0, n_records, b)]


def _setup(cfg: dict[str, Any], tmp: str) -> tuple[str, list[dict[str, Any]], list[list[int]]]:
    model_dir = f"{tmp}/model"
    build_model(cfg["model"], model_dir)
    from misp.models.vlm import VLMSpec, load_vlm

    _, processor = load_vlm(VLMSpec(path=model_dir))
    records = make_records(cfg["batch"] * cfg["steps"], cfg["words"], _image_sizes(cfg["model"], processor), cfg["seed"])
    return model_dir, records, _batches(len(records), cfg["batch"])


# ------------------------------------------------------------------------------------------------------
# children


def time_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child: every contender of one model, the log-prob check, then alternating timed repeats."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="misp-bench-trl-") as tmp:
        model_dir, records, batches = _setup(cfg, tmp)
        contenders = {name: make_contender(name, model_dir, records, tmp) for name in cfg["contenders"]}
        res: dict[str, Any] = {}
        # Check: same tokens, same reference log-probs, before any step changes a weight.
        misp = next((c for n, c in contenders.items() if n.startswith("misp")), None)
        trl = next((c for n, c in contenders.items() if n.startswith("trl")), None)
        if misp is not None and trl is not None:
            mc, mr, mt = misp.reference_logps(batches[0])
            tc, tr, tt = trl.reference_logps(batches[0])
            if mt != tt:
                raise RuntimeError("TRL's rows hold other tokens than misp's: the comparison would be unfair")
            diff = float(torch.cat([(mc - tc).abs(), (mr - tr).abs()]).max())
            scale = float(torch.cat([mc, mr]).abs().max())
            if diff > 1e-3 * max(scale, 1.0):
                raise RuntimeError(f"reference log-probs differ: max |misp - TRL| {diff} at scale {scale}")
            res["logps_max_abs_diff"] = diff
            res["logps_scale"] = scale
            res["seq_len"] = max(len(t) for t in mt)
        if "misp-warm" in contenders:
            contenders["misp-warm"].fill_cache(batches)
        allocator_steady()
        for c in contenders.values():  # warm-up: optimizer state, allocator, first-call costs
            c.step(batches[0])
        names = list(contenders)
        times: dict[str, list[float]] = {n: [] for n in names}  # seconds per repeat (steps batches)
        for rep in range(cfg["repeats"]):
            for name in names if rep % 2 == 0 else names[::-1]:
                synchronize(cfg["device"])
                t0 = time.perf_counter()
                for indices in batches:
                    contenders[name].step(indices)
                synchronize(cfg["device"])
                times[name].append(time.perf_counter() - t0)
        samples = cfg["batch"] * len(batches)
        res["samples_per_s"] = {n: [samples / t for t in ts] for n, ts in times.items()}
        first = next(iter(contenders.values()))
        res["params"] = sum(p.numel() for p in (first.module.model if isinstance(first, MispContender) else first.model).parameters())
        return res


def memory_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child: one contender; peak resident memory of ``steps`` steps after a warm-up step."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="misp-bench-trl-") as tmp:
        model_dir, records, batches = _setup(cfg, tmp)
        contender = make_contender(cfg["contender"], model_dir, records, tmp)
        if cfg["contender"] == "misp-warm":
            contender.fill_cache(batches)
        contender.step(batches[0])
        with PeakMemory(cfg["device"]) as mem:
            for indices in batches:
                contender.step(indices)
        import resource

        return {"peak_bytes": mem.peak_bytes, "method": mem.method,
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ------------------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Per model: the timing child (all contenders, alternating) and a memory child per contender."""
    if importlib.util.find_spec("trl") is None:
        # Not a runtime dependency: python -m bench runs the other benchmarks without it.
        print("trl_dpo: skipped, TRL is not installed (pip install -e '.[bench]', or make bench)\n")
        return {"tables": [], "skipped": "trl not installed"}
    models = [m.strip() for m in args.trl_models.split(",") if m.strip()]
    contenders = [c.strip() for c in args.trl_contenders.split(",") if c.strip()]
    bad = [m for m in models if m not in MODELS] + [c for c in contenders if c not in CONTENDERS]
    if bad or not models or not contenders:
        raise ValueError(f"unknown --trl-models/--trl-contenders {bad}; models {list(MODELS)}, contenders {list(CONTENDERS)}")
    if min(args.trl_batch, args.trl_steps, args.trl_repeats, args.trl_words) < 1:
        raise ValueError("--trl-batch, --trl-steps, --trl-repeats and --trl-words must be positive")
    base = {"device": args.device, "seed": 0, "batch": args.trl_batch, "steps": args.trl_steps,
            "repeats": args.trl_repeats, "words": args.trl_words}
    if args.quick:
        models, base = ["tiny"], base | {"batch": 2, "steps": 1, "repeats": 1}
    rows, raw = [], []
    reference = "trl" if "trl" in contenders else contenders[-1]
    for model in models:
        cfg = {**base, "model": model, "contenders": contenders}
        timing = run_child("bench.trl_dpo:time_child", cfg, args.threads)
        memory = {c: run_child("bench.trl_dpo:memory_child", {**base, "model": model, "contender": c}, args.threads)
                  for c in contenders}
        raw.append({"config": cfg, "timing": timing, "memory": memory})
        sps = timing["samples_per_s"]
        for c in contenders:
            ratios = [a / b for a, b in zip(sps[c], sps[reference], strict=True)]
            rows.append({
                "model": f"{model} ({timing['params'] / 1e6:.2f}M, {timing.get('seq_len', '?')} tokens)",
                "contender": c,
                "sps": statistics.median(sps[c]),
                "ratio": statistics.median(ratios),
                "range": _spread(ratios),
                "peak_mib": mib(memory[c]["peak_bytes"]),
                "mem_ratio": memory[c]["peak_bytes"] / max(memory[reference]["peak_bytes"], 1),
                "rss_mib": mib(memory[c]["max_rss_bytes"]),
                "diff": timing.get("logps_max_abs_diff"),
            })
    return {
        "config": base | {"models": models, "contenders": contenders},
        "tables": [{
            "title": f"misp's DPO step vs trl.DPOTrainer's (pairwise, no image negatives): B={base['batch']}, "
                     f"float32, AdamW; samples/s: median of {base['repeats']} alternating repeats of "
                     f"{base['steps']} steps; ratios against '{reference}' per repeat, median (range); "
                     "peak: step memory on top of model, reference, optimizer state and records (fresh process "
                     "per contender); max RSS: the whole process",
            "columns": [("model", "model (params, longest row)"), ("contender", "contender"),
                        ("sps", "samples/s"), ("ratio", f"samples/s ratio vs {reference}"), ("range", "range"),
                        ("peak_mib", "step peak (MiB)"), ("mem_ratio", f"peak ratio vs {reference}"),
                        ("rss_mib", "process max RSS (MiB)"), ("diff", "max |ref logp misp - TRL|")],
            "rows": rows,
        }],
        "raw": raw,
    }
