"""bench/gpu_check.py: its FLOP formula against torch's FLOP counter, and its CPU dry run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from bench.gpu_check import main, step_flops
from misp.models.llava15 import Llava15Sizes, build_llava15
from misp.models.prompting import encode_example, preprocess_images
from misp.models.vlm import LoraSpec

ROOT = Path(__file__).resolve().parents[2]


def test_step_flops_match_torch_flop_counter():
    """Every term of the formula equals what torch counts for the same work (eager attention, so that the
    attention matmuls are visible to the counter), row by row."""
    from peft import get_peft_model

    # 112 px: 64 image tokens keep the eager attention quick; the formula is the same at 336 px.
    model, processor = build_llava15(Llava15Sizes(image_size=112, text_layers=2, vision_layers=3))
    model.set_attn_implementation("eager")
    model.requires_grad_(False)
    r = 8
    policy = get_peft_model(model, LoraSpec(r=r, alpha=16, dropout=0.0).to_peft())
    lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    pixels = preprocess_images(processor, [Image.fromarray(np.zeros((50, 60, 3), dtype=np.uint8))])
    rows = [encode_example(processor, "Is there a dog?", "Yes, there is a dog."),
            encode_example(processor, "Please describe this image in detail.", "A red circle on a blue table.")]
    counted = {"policy": 0, "reference": 0, "vision": 0}
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad(), FlopCounterMode(display=False) as vision:
            policy.base_model.model.model.get_image_features(pixel_values=pixels)
        with FlopCounterMode(display=False) as train:
            policy(input_ids=ids, pixel_values=pixels).logits.sum().backward()
        with torch.no_grad(), policy.disable_adapter(), FlopCounterMode(display=False) as ref:
            policy(input_ids=ids, pixel_values=pixels)
        # Each forward encodes the image once: the vision share is counted apart.
        counted["policy"] += train.get_total_flops() - vision.get_total_flops()
        counted["reference"] += ref.get_total_flops() - vision.get_total_flops()
        counted["vision"] += 2 * vision.get_total_flops()
    lengths = [len(row["input_ids"]) for row in rows]
    # Per row one image here; the formula's vision term is per distinct image, so pass one per row.
    got = step_flops(model.config, lengths, n_images=len(rows), lora_params=lora, lora_r=r)
    for key, value in counted.items():
        assert got[key] == pytest.approx(value, rel=1e-9), key
    assert got["total"] == pytest.approx(sum(counted.values()), rel=1e-9)


def test_dry_run_trains_and_reports(tmp_path):
    out = tmp_path / "gpu_check.json"
    results = main(["--dry-run", "--out", str(out), "--peak-tflops", "1.0", "--work-dir", str(tmp_path / "work")])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["dry_run"] and saved["strategy"] == "SingleDeviceStrategy" and saved["precision"] == yaml.safe_load((ROOT / "configs/llava.yaml").read_text())["trainer"]["precision"]
    assert saved["batch"] == {"records": 1, "k": 3, "rows": 5, "images": 4}
    assert len(saved["step_s_all"]) == 2 and all(math.isfinite(x) for x in saved["losses"])
    assert saved["tokens_per_step"] > 5 * 576  # every row holds the 576 image tokens
    assert saved["lora_parameters"] > 0 and saved["model_flops_per_step"] > 0
    assert saved["mfu"] == pytest.approx(saved["achieved_tflops"] / 1.0)
    assert (tmp_path / "work/hub/models--llava-hf--llava-1.5-7b-hf/refs/main").is_file()


def test_qwen_vision_flops_match_torch_flop_counter():
    """The Qwen2.5-VL vision term (windowed and full-attention blocks, merger) equals what torch counts for
    an image spanning several attention windows, partial ones included."""
    from bench.gpu_check import qwen_vision_flops
    from misp.models.prompting import prepare_images
    from misp.testing.qwen25vl import Qwen25VLSizes, build_qwen25vl

    model, processor = build_qwen25vl(Qwen25VLSizes(vision_layers=3))
    model.set_attn_implementation("eager")
    images = prepare_images(processor, [Image.fromarray(np.zeros((168, 224, 3), dtype=np.uint8))])
    grid = tuple(int(x) for x in images.tensors["image_grid_thw"][0])
    assert grid == (1, 12, 16)  # 6 x 8 merged units: windows of 4 x 4, 2 x 4, 4 x 4 and 2 x 4
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        model.model.get_image_features(images.tensors["pixel_values"], images.tensors["image_grid_thw"])
    assert qwen_vision_flops(model.config.vision_config, grid) == pytest.approx(counted.get_total_flops(), rel=1e-9)


def test_qwen_dry_run_trains_and_reports(tmp_path):
    results = main(["--dry-run", "--family", "qwen2.5-vl", "--out", str(tmp_path / "gpu_check.json"),
                    "--peak-tflops", "1.0", "--work-dir", str(tmp_path / "work")])
    assert results["family"] == "qwen2.5-vl" and all(math.isfinite(x) for x in results["losses"])
    assert results["model_flops_split"]["vision"] > 0 and results["tokens_per_step"] > 0
