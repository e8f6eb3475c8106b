"""One-command GPU check of the real-model path: LLaVA-1.5 or Qwen2.5-VL at 7B width, 4-bit nf4 + LoRA,
MISP-DPO under FSDP.

    python -m bench.gpu_check                  # one GPU (H100/H200): about 3-5 minutes
    python -m bench.gpu_check --family qwen2.5-vl   # the same at Qwen2.5-VL-7B's width, configs/qwen25vl.yaml
    python -m bench.gpu_check --dry-run        # CPU, tiny widths, seconds: checks the script end to end

With ``--family qwen2.5-vl`` the model is ``misp.testing.qwen25vl`` at Qwen2.5-VL-7B's widths (3584-wide
decoder, 28 heads, 4 key/value heads, 18944 MLP, 152064 rows; 1280-wide windowed ViT) and everything the
LLaVA steps below take from configs/llava.yaml comes from configs/qwen25vl.yaml (its pixel bounds too: the
400x500 synthetic images become 252 image tokens each). Its vision FLOPs count each image's patches
through the windowed and full-attention blocks and the merger (``qwen_vision_flops``).

Steps, each timed:

1. build: ``misp.testing.llava15.build_llava15`` at LLaVA-1.5-7B's widths (4096 hidden, 32 heads, 11008 MLP,
   32064 embedding rows; ViT-L/14 at 336 px, 1024 wide) with ``--text-layers`` / ``--vision-layers``
   layers, random weights, in bf16 on the device;
2. save: ``write_hub_cache`` into a scratch hub cache as ``llava-hf/llava-1.5-7b-hf`` (sharded safetensors);
3. load: ``MISPDPOModule`` with configs/llava.yaml's ``model.init_args`` (its ``vlm`` spec: 4-bit nf4,
   bf16 compute and storage, LoRA r64/alpha128; its objective), read offline from that cache;
4. train: ``--steps`` MISP-DPO steps under ``lightning.Trainer`` with configs/llava.yaml's strategy
   (``FSDPStrategy``, Llama decoder layers as wrap and activation-checkpointing units) and precision
   (bf16-mixed: float32 LoRA under bf16 autocast) on one device. Each step: the policy forward + backward over the 2B + BK rows of B
   records with K negatives (chosen and rejected on the positive, chosen on each negative; each of the
   B + BK images encoded once), the reference forward (adapters off; no cache, as in a first epoch),
   the MISP loss and the proposal's loss, the optimiser step.

Printed and written to ``--out`` (JSON): per-phase times, the median and per-step time of the steps after
``--warmup``, tokens/s, peak device memory, and the model FLOP utilisation (MFU).

Prefix sharing (issue 23, ``MISPDPOModule(prefix_sharing=...)``): ``--prefix-sharing both`` (the default on a
GPU) trains twice from the same saved model, sharing on (the shipped default: chosen and rejected on the
positive image run as one packed row, the image and prompt computed once) and off, and reports both; the
top-level results are the "on" run's, the other run's under ``"prefix_sharing_off"`` (or ``_on``). With
sharing on, the rows the FLOPs count are the packed rows the forward runs (each shared prefix once; attention
over the packed row's full length, as the dense block mask computes it). "Off" turns bin packing
(``padding_free``) off too; "on" runs both as shipped.

Model FLOPs of a step (MFU's numerator; the work the algorithm needs: no recomputation from activation
checkpointing, no 4-bit dequantisation, padding excluded), with P the language model's matmul weights
per token (decoder linears + LM head), d its width and L its layers, T_r the tokens of row r (image
tokens included), P_lora the LoRA weights, I = B + BK images of 577 patch tokens through the vision
tower (V weights per token, width d_v, L_v layers) and the projector (Q weights per image token):

    language model, policy     sum_r (4 P + 6 P_lora - 2 P_0) T_r + 3 * 4 L d T_r^2
                               (frozen base: forward and input gradients; LoRA: forward and both
                               gradients; attention: forward + 2x; P_0 = d (d + 2 d_kv) + 3 r d: layer 0's
                               q/k/v input gradients, never computed as the embeddings need none)
    language model, reference  sum_r 2 P T_r + 4 L d T_r^2                        (forward only)
    vision + projector         2 * I * (2 V 577 + 4 L_v d_v 577^2 + 2 Q 576)    (forward only, both passes;
                                                                                 Q includes the patch
                                                                                 embedding)

Attention is counted without the causal mask's saving (the usual convention). MFU = model FLOPs /
(step time * the device's dense bf16 peak); the peak comes from the device name (H100 SXM and H200: 989
TFLOP/s, H100 PCIe: 756, A100: 312) or ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
LLAVA_CONFIG = ROOT / "configs" / "llava.yaml"
FAMILY_CONFIGS = {"llava-1.5": LLAVA_CONFIG, "qwen2.5-vl": ROOT / "configs" / "qwen25vl.yaml"}
"""The shipped config each ``--family`` follows."""
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_check.json"

PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0))
"""Dense bf16 tensor-core peaks by device-name substring (first match wins), in TFLOP/s."""

WORDS = ("a the red blue green small large dog cat person table chair car tree near left right top bottom of "
         "and is there in image picture with next to above below sitting standing one two three white black").split()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny widths (Llava15Sizes defaults; still 576 image tokens), 1 record, 2 steps")
    p.add_argument("--family", choices=sorted(FAMILY_CONFIGS), default="llava-1.5",
                   help="the architecture at 7B width, and the shipped config it follows")
    p.add_argument("--text-layers", type=int, default=4, help="Llama decoder layers at 7B width")
    p.add_argument("--vision-layers", type=int, default=4, help="CLIP ViT-L/14-336 layers")
    p.add_argument("--batch", type=int, default=2, help="B: preference records per step (configs/llava.yaml: 2)")
    p.add_argument("--k", type=int, default=3, help="K: negatives per record")
    p.add_argument("--pool-size", type=int, default=16, help="M: candidates per record the proposal ranks")
    p.add_argument("--prompt-words", type=int, default=12, help="words in each prompt")
    p.add_argument("--response-words", type=int, default=96, help="words in each chosen / rejected response")
    p.add_argument("--steps", type=int, default=20, help="training steps")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timings")
    p.add_argument("--lora-r", type=int, default=64, help="LoRA rank (configs/llava.yaml: 64)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s")
    p.add_argument("--strategy", choices=("config", "auto"), default=None,
                   help="config: configs/llava.yaml's FSDPStrategy (default on a GPU); auto: Lightning's "
                        "single-device strategy (default for --dry-run: Lightning's FSDPStrategy needs a GPU)")
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix-sharing", choices=("on", "off", "both"), default=None,
                   help="train with prefix sharing on, off, or both in turn (default: both; --dry-run: on)")
    return p


# config --------------------------------------------------------------------------------------------------
def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def llava_config(family: str = "llava-1.5") -> dict:
    """The family's shipped config (configs/llava.yaml, configs/qwen25vl.yaml) as a dict (the check follows
    it rather than restating it)."""
    return yaml.safe_load(FAMILY_CONFIGS[family].read_text())


def config_strategy(config: dict):
    """The Trainer strategy configs/llava.yaml asks for, instantiated (class paths imported)."""
    spec = config["trainer"]["strategy"]
    kwargs = dict(spec.get("init_args", {}))
    for key in ("auto_wrap_policy", "activation_checkpointing_policy"):
        if key in kwargs:
            kwargs[key] = {_import(c) for c in kwargs[key]}
    return _import(spec["class_path"])(**kwargs)


# data ----------------------------------------------------------------------------------------------------
class _Batches(torch.utils.data.Dataset):
    """``steps`` synthetic MISP-DPO batches, ``misp.batch.PreferenceBatch`` as NegativeSamplerDataModule makes them."""

    def __init__(self, processor, steps: int, b: int, k: int, m: int, prompt_words: int, response_words: int,
                 seed: int) -> None:
        self.processor, self.steps, self.b, self.k, self.m = processor, steps, b, k, m
        self.prompt_words, self.response_words, self.seed = prompt_words, response_words, seed

    def __len__(self) -> int:
        return self.steps

    def features(self) -> ProposalFeatures:  # noqa: F821 - imported inside, as every misp import here
        """q_phi's features of every record of every step, by record id (what the handshake hands the module)."""
        from misp.data.handshake import ProposalFeatures

        per_step = [torch.randn(self.b, self.m, 4, generator=torch.Generator().manual_seed(i)) for i in range(self.steps)]
        ids = [f"step{i}-record{j}" for i in range(self.steps) for j in range(self.b)]
        features = torch.cat(per_step) if per_step else torch.zeros(0, self.m, 4)
        return ProposalFeatures(features, torch.ones(len(ids), self.m, dtype=torch.bool), {r: n for n, r in enumerate(ids)})

    def __getitem__(self, i: int):
        from misp.batch import NegativeRef, PreferenceBatch, TokenRows
        from misp.data.pixel_cache import image_inputs
        from misp.models.prompting import collate_examples, encode_example

        rng = random.Random(self.seed * 1_000_003 + i)
        np_rng = np.random.default_rng(self.seed * 1_000_003 + i)

        def words(n: int) -> str:
            return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

        pad = self.processor.tokenizer.pad_token_id
        chosen, rejected = [], []
        for _ in range(self.b):
            prompt = words(self.prompt_words)
            chosen.append(encode_example(self.processor, prompt, words(self.response_words)))
            rejected.append(encode_example(self.processor, prompt, words(self.response_words)))
        c, r = collate_examples(chosen, pad), collate_examples(rejected, pad)
        images = [Image.fromarray(np_rng.integers(0, 256, (400, 500, 3), dtype=np.uint8))
                  for _ in range(self.b * (1 + self.k))]
        draw_index = torch.tensor([[rng.randrange(self.m) for _ in range(self.k)] for _ in range(self.b)])
        return PreferenceBatch(
            ids=[f"step{i}-record{j}" for j in range(self.b)],
            chosen=TokenRows(c["input_ids"], c["attention_mask"], c["labels"]),
            rejected=TokenRows(r["input_ids"], r["attention_mask"], r["labels"]),
            images=image_inputs(self.processor, images),
            negatives=[[NegativeRef("sae", f"step{i}-record{j}-negative{n}", n) for n in range(self.k)] for j in range(self.b)],
            log_q=torch.full((self.b, self.k), -math.log(self.m)),
            draw_index=draw_index,
        )


def _datamodule(processor, args: argparse.Namespace):
    import lightning as L

    from misp.data.handshake import DataDescription, NegativesDescription

    data = _Batches(processor, args.steps, args.batch, args.k, args.pool_size, args.prompt_words,
                    args.response_words, args.seed)

    class Data(L.LightningDataModule):
        def describe(self) -> DataDescription:
            """The handshake's data side: q_phi's features (source and K are the module's method's)."""
            return DataDescription(negatives=NegativesDescription(data.features))

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False)

    return Data()


# measurement ---------------------------------------------------------------------------------------------
def row_lengths(batch, pad_token_id: int, image_token_id: int) -> list[int]:
    """Non-padding tokens of each of the 2B + BK rows the policy and the reference see, image tokens
    counted as the forward expands them (a dynamic-resolution family's rows hold one placeholder)."""
    from misp.dpo.batching import concatenate_rows
    from misp.models.forward import expand_image_rows

    rows = concatenate_rows(batch, pad_token_id)
    per_row = batch.images.tokens_per_image[rows.image_index.to(batch.images.tokens_per_image.device)]
    _, mask, _ = expand_image_rows(rows.input_ids, rows.attention_mask, None, image_token_id, per_row)
    return mask.sum(1).tolist()


def packed_row_lengths(batch, pad_token_id: int, image_token_id: int) -> list[int]:
    """Tokens of each row the forward runs with prefix sharing on: each shared group's packed row
    (prefix once, then its responses) and every unshared row as it is (``misp.models.prefix_sharing``)."""
    from misp.dpo.batching import concatenate_rows
    from misp.models.forward import expand_image_rows
    from misp.models.prefix_sharing import plan_packing

    rows = concatenate_rows(batch, pad_token_id)
    per_row = batch.images.tokens_per_image[rows.image_index.to(batch.images.tokens_per_image.device)]
    ids, mask, labels = expand_image_rows(rows.input_ids, rows.attention_mask, rows.labels, image_token_id, per_row)
    plan = plan_packing(ids.cpu(), mask.cpu(), labels.cpu(), [(int(i),) for i in rows.image_index.cpu()])
    return mask.sum(1).tolist() if plan is None else plan.lengths.tolist()


def qwen_vision_flops(vision_config, grid: tuple[int, int, int]) -> float:
    """Forward FLOPs of one image of patch grid ``(t, h, w)`` through Qwen2.5-VL's vision model: the 3-D
    patch embedding, every block's projections and MLP, attention within the 112 px windows (or over the
    whole image in the full-attention blocks), and the 2x2 merger into the decoder's width."""
    v = vision_config
    t, h, w = grid
    n = t * h * w
    dv, fv, merge = v.hidden_size, v.intermediate_size, v.spatial_merge_size
    embed = 2 * n * dv * v.in_channels * v.temporal_patch_size * v.patch_size**2
    per_block = 2 * n * (4 * dv * dv + 3 * dv * fv)
    ws = v.window_size // merge // v.patch_size  # window side in merged units
    hh, ww = h // merge, w // merge
    sides_h = [min(ws, hh - i) for i in range(0, hh, ws)]
    sides_w = [min(ws, ww - j) for j in range(0, ww, ws)]
    windowed = t * sum((merge**2 * a * b) ** 2 for a in sides_h for b in sides_w)
    full = len(v.fullatt_block_indexes)
    attention = 4 * dv * (full * n * n + (v.depth - full) * windowed)
    merged = n // merge**2
    width = dv * merge**2
    merger = 2 * merged * (width * width + width * v.out_hidden_size)
    return float(embed + v.depth * per_block + attention + merger)


def step_flops(config, lengths: list[int], n_images: int, lora_params: int, lora_r: int,
               image_grid: tuple[int, int, int] | None = None) -> dict[str, float]:
    """Model FLOPs of one MISP-DPO step (see the module docstring for the formula).

    Args:
        config: the ``LlavaConfig``.
        lengths: non-padding tokens of each row.
        n_images: distinct images of the step.
        lora_params: LoRA weights in the language model (A and B of every adapted projection).
        lora_r: their rank (for the layer-0 q/k/v input gradients that are never computed).
        image_grid: Qwen2.5-VL: each image's patch grid ``(t, h, w)`` (the images of a step share a size).
    """
    t, v = config.text_config, config.vision_config
    d, f, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = d * t.num_key_value_heads // t.num_attention_heads
    p_text = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * t.vocab_size
    if image_grid is not None:  # Qwen2.5-VL: its vision tower and merger, per image of this grid
        p_first = d * d + 2 * d * kv + 3 * lora_r * d
        attn = [4 * layers * d * n * n for n in lengths]
        policy = sum((4 * p_text + 6 * lora_params - 2 * p_first) * n for n in lengths) + 3 * sum(attn)
        reference = sum(2 * p_text * n for n in lengths) + sum(attn)
        vision = 2 * n_images * qwen_vision_flops(v, image_grid)
        return {"policy": float(policy), "reference": float(reference), "vision": float(vision),
                "total": float(policy + reference + vision)}
    dv, fv, lv = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    patches = (v.image_size // v.patch_size) ** 2
    p_vis = lv * (4 * dv * dv + 2 * dv * fv)  # per token: the layers (CLS included)
    p_patch = 3 * v.patch_size**2 * dv  # per patch: the patch embedding
    p_proj = dv * d + d * d
    # Layer 0's q/k/v read the embeddings, which need no gradient: their input gradients (base and LoRA A)
    # are never computed.
    p_first = d * d + 2 * d * kv + 3 * lora_r * d
    attn = [4 * layers * d * n * n for n in lengths]
    policy = sum((4 * p_text + 6 * lora_params - 2 * p_first) * n for n in lengths) + 3 * sum(attn)
    reference = sum(2 * p_text * n for n in lengths) + sum(attn)
    vision = 2 * n_images * (2 * p_vis * (patches + 1) + 4 * lv * dv * (patches + 1) ** 2 + 2 * (p_patch + p_proj) * patches)
    return {"policy": float(policy), "reference": float(reference), "vision": float(vision),
            "total": float(policy + reference + vision)}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def _step_timer(pad_token_id: int, image_token_id: int, device: torch.device, warmup: int, sharing: bool = False):
    import lightning as L

    class StepTimer(L.Callback):
        """Wall time (device synchronised), tokens and images of each training step."""

        def __init__(self) -> None:
            self.steps: list[dict] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _sync(device)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.steps.append({"seconds": time.perf_counter() - self._t0,
                               "rows": row_lengths(batch, pad_token_id, image_token_id),
                               "run_rows": (packed_row_lengths if sharing else row_lengths)(batch, pad_token_id,
                                                                                            image_token_id),
                               "images": len(batch.images),
                               "loss": float(loss)})

    return StepTimer()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    # CPU: the process's resident-set high-water mark (Linux reports KiB).
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


# the check -----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    """Build, save, load and train as the module docstring says; returns the results (also written to args.out)."""
    from dataclasses import replace

    import lightning as L

    from misp.dpo import MISPDPOModule
    from misp.dpo.method import Method
    from misp.methods import DEFAULT_METHOD
    from misp.models.families import family_for_processor
    from misp.models.vlm import LoraSpec, VLMSpec, unwrap_peft
    from misp.negatives.spec import Negatives
    from misp.testing import qwen25vl
    from misp.testing.hub_cache import publish_snapshot, use_hub_cache
    from misp.testing.llava15 import HUB_REPO_ID, Llava15Sizes, build_llava15, write_hub_cache
    from misp.utils.io import atomic_write_json

    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU visible to torch; run with --dry-run for the CPU smoke check")
    config = llava_config(args.family)
    init = config["model"]["init_args"]
    qwen = args.family == "qwen2.5-vl"
    if qwen:
        sizes = qwen25vl.Qwen25VLSizes() if args.dry_run else qwen25vl.Qwen25VLSizes.real_width(args.text_layers, args.vision_layers)
        build, hub_id = qwen25vl.build_qwen25vl, qwen25vl.HUB_REPO_ID
    else:
        sizes = Llava15Sizes() if args.dry_run else Llava15Sizes.real_width(args.text_layers, args.vision_layers)
        build, hub_id = build_llava15, HUB_REPO_ID
    phases: dict[str, float] = {}
    work = tempfile.TemporaryDirectory(prefix="misp-gpu-check-") if args.work_dir is None else None
    work_dir = Path(work.name) if work is not None else args.work_dir
    try:
        t0 = time.perf_counter()
        model, processor = build(sizes, seed=args.seed, device=device, dtype=torch.bfloat16)
        _sync(device)
        phases["build_s"] = time.perf_counter() - t0
        n_params = sum(p.numel() for p in model.parameters())

        t0 = time.perf_counter()
        cache = work_dir / "hub"
        shard = "2GB" if not args.dry_run else "300KB"
        if qwen:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".staging-", dir=cache) as staging:
                qwen25vl.save_qwen25vl_hub_files(model, processor, staging, max_shard_size=shard)
                publish_snapshot(staging, cache, hub_id)
        else:
            write_hub_cache(model, processor, cache, max_shard_size=shard)
        phases["save_s"] = time.perf_counter() - t0
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        vlm = {k: v for k, v in init["vlm"].items() if k != "lora"} | {"path": hub_id}
        if qwen and args.dry_run:  # tiny images at the tiny model's pixel bounds
            vlm |= {"min_pixels": sizes.min_pixels, "max_pixels": sizes.max_pixels}
        lora = init["vlm"].get("lora", {}) | {"r": args.lora_r}
        settings = {"on": [True], "off": [False], "both": [True, False]}[args.prefix_sharing]
        runs = {}
        for sharing in settings:
            suffix = "" if sharing == settings[0] else "_sharing_" + ("on" if sharing else "off")
            t0 = time.perf_counter()
            with use_hub_cache(cache):
                module = MISPDPOModule(
                    vlm=VLMSpec(**vlm, lora=LoraSpec(**lora)),
                    # The paper's method at this check's K (the base config names none: it runs DEFAULT_METHOD).
                    method=replace(Method.preset(DEFAULT_METHOD), negatives=Negatives("sae", args.k)),
                    cache_reference=False,  # every step computes its reference, as the first epoch does
                    lr=float(init.get("lr", 1e-5)), warmup_steps=1, prefix_sharing=sharing, padding_free=sharing,
                )
            phases["load" + suffix + "_s"] = time.perf_counter() - t0
            lora_params = sum(p.numel() for n, p in module.model.named_parameters() if "lora_" in n)
            model_config = unwrap_peft(module.model).config

            accelerator = "cpu" if device.type == "cpu" else "gpu"
            use_config = args.strategy == "config" or (args.strategy is None and device.type == "cuda")
            strategy = config_strategy(config) if use_config else "auto"
            timer = _step_timer(processor.tokenizer.pad_token_id, family_for_processor(processor).image_token_id(processor),
                                device, args.warmup, sharing)
            trainer = L.Trainer(
                accelerator=accelerator, devices=1, strategy=strategy, precision=config["trainer"]["precision"],
                max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer],
                default_root_dir=str(work_dir / f"run{suffix}"),
                gradient_clip_val=config["trainer"].get("gradient_clip_val"),
                reload_dataloaders_every_n_epochs=config["trainer"].get("reload_dataloaders_every_n_epochs", 0),
            )
            t0 = time.perf_counter()
            data = _datamodule(processor, args)
            module.attach_data(data.describe())
            trainer.fit(module, datamodule=data)
            phases["fit" + suffix + "_s"] = time.perf_counter() - t0
            runs[sharing] = (timer, _peak_memory_gib(device), type(trainer.strategy).__name__)
            del module, trainer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    finally:
        if work is not None:
            work.cleanup()

    grid = None
    if qwen:  # the synthetic images share one size, so one grid
        probe = Image.fromarray(np.zeros((400, 500, 3), dtype=np.uint8))
        from misp.models.prompting import prepare_images

        grid = tuple(int(x) for x in prepare_images(processor, [probe]).tensors["image_grid_thw"][0])
    peak = peak_tflops(device, args.peak_tflops)

    def summary(timer, memory: dict) -> dict:
        measured = timer.steps[args.warmup:]
        if len(timer.steps) != args.steps or not measured:
            raise RuntimeError(f"ran {len(timer.steps)} of {args.steps} steps")
        losses = [s["loss"] for s in timer.steps]
        if not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"non-finite loss: {losses}")
        seconds = statistics.median(s["seconds"] for s in measured)
        tokens = statistics.median(sum(s["rows"]) for s in measured)
        flops = [step_flops(model_config, s["run_rows"], s["images"], lora_params, args.lora_r, grid) for s in measured]
        achieved = statistics.fmean(f["total"] for f in flops) / seconds
        return {
            "step_s": seconds,
            "step_s_all": [s["seconds"] for s in timer.steps],
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / seconds,
            "tokens_run_per_step": statistics.median(sum(s["run_rows"]) for s in measured),
            "losses": losses,
            **memory,
            "model_flops_per_step": statistics.fmean(f["total"] for f in flops),
            "model_flops_split": {k: statistics.fmean(f[k] for f in flops) for k in ("policy", "reference", "vision")},
            "achieved_tflops": achieved / 1e12,
            "peak_bf16_tflops": peak,
            "mfu": achieved / (peak * 1e12) if peak else None,
        }

    first = settings[0]
    timer, memory, strategy_name = runs[first]
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "family": args.family,
        "dry_run": args.dry_run,
        "sizes": vars(sizes),
        "parameters": n_params,
        "lora_parameters": lora_params,
        "strategy": strategy_name,
        "precision": config["trainer"]["precision"],
        "batch": {"records": args.batch, "k": args.k, "rows": 2 * args.batch + args.batch * args.k,
                  "images": args.batch * (1 + args.k)},
        "phases_s": phases,
        "prefix_sharing": "on" if first else "off",
        **summary(timer, memory),
    }
    for sharing in settings[1:]:
        results["prefix_sharing_" + ("on" if sharing else "off")] = summary(runs[sharing][0], runs[sharing][1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, results)
    return results


def _report(r: dict) -> str:
    mem = (f"peak memory {r['peak_allocated_gib']:.2f} GiB allocated, {r['peak_reserved_gib']:.2f} GiB reserved"
           if "peak_allocated_gib" in r else f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    mfu = f"MFU {100 * r['mfu']:.1f}% of {r['peak_bf16_tflops']:.0f} TFLOP/s" if r["mfu"] is not None else "MFU n/a (no peak known)"
    phases = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in r["phases_s"].items())
    return (f"gpu_check on {r['device']} ({r['strategy']}, prefix sharing {r['prefix_sharing']}, {r['precision']}, {r['parameters'] / 1e9:.2f}B params, "
            f"{r['lora_parameters'] / 1e6:.1f}M LoRA)\n"
            f"  phases: {phases}\n"
            f"  step {r['step_s']:.3f}s (median after warm-up; all: {', '.join(f'{s:.2f}' for s in r['step_s_all'])})\n"
            f"  {r['tokens_per_step']:.0f} tokens/step over {r['batch']['rows']} rows, {r['tokens_per_s']:.0f} tokens/s\n"
            f"  {mem}\n"
            f"  model FLOPs/step {r['model_flops_per_step'] / 1e12:.2f} TFLOP, achieved {r['achieved_tflops']:.2f} TFLOP/s, {mfu}\n"
            f"  losses: {', '.join(f'{x:.4f}' for x in r['losses'])}"
            + "".join(f"\n  {key.replace('_', ' ')}: step {o['step_s']:.3f}s, {o['tokens_per_s']:.0f} tokens/s, "
                      f"model FLOPs/step {o['model_flops_per_step'] / 1e12:.2f} TFLOP, "
                      + (f"MFU {100 * o['mfu']:.1f}%" if o["mfu"] is not None else "MFU n/a")
                      + f"; sharing {r['prefix_sharing']} is {o['step_s'] / r['step_s']:.2f}x faster"
                      for key, o in r.items() if key.startswith("prefix_sharing_")))


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    if args.dry_run:
        # Seconds on a CPU: one record, two steps, short responses (the image geometry stays 576 tokens).
        defaults = _parser().parse_args([])
        for name, small in (("batch", 1), ("steps", 2), ("warmup", 1), ("response_words", 8), ("lora_r", 8),
                            ("prefix_sharing", "on")):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, small)
    if args.prefix_sharing is None:
        args.prefix_sharing = "both"
    results = run(args)
    print(_report(results))
    print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
