"""The real-model path for Qwen2.5-VL: configs/qwen25vl_sae.yaml and configs/qwen25vl.yaml as shipped, on a
tiny Qwen2.5-VL stored in an offline hub cache as ``Qwen/Qwen2.5-VL-7B-Instruct``.

As tests/test_llava_real_path.py does for LLaVA (its data, strategy and size helpers are reused): only
sizes, devices (CPU, 2 gloo processes) and the strategy's CPU subclass differ from a GPU run. The mDPO
records are an RLAIF-V parquet with embedded images, as the hub publishes them (mDPO's LLaVA-templated
prompts and their re-templating into Qwen's are tests/models/test_family_rows.py's).
POPE generation is left to tests/test_family_rows.py (Qwen's generation against ``model.generate``) and to
the LLaVA path (``misp test`` under FSDP), to keep this test's processes few.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_llava_real_path import N_RECORDS, ROOT, _dpo_sizes, _misp, _sizes, _with_cpu_fsdp, _write_data

from misp.smoke import smoke_clip_hub
from misp.testing.hub_cache import hub_cache_env, use_hub_cache
from misp.testing.qwen25vl import HUB_REPO_ID, write_qwen25vl_hub_cache

RUN = "runs/qwen25vl/misp_dpo"
RLAIFV = "data/rlaifv/train.parquet"
# The preference records as openbmb/RLAIF-V-Dataset publishes them (parquet, images embedded as bytes),
# read by the shipped config with no conversion step (docs/data.md).
RECORDS = [f"--data.init_args.records_file={RLAIFV}", "--data.init_args.layout=rlaifv"]


def _write_rlaifv(world, path) -> None:
    """The tiny world's preference records in RLAIF-V's columns, images embedded, as one parquet file."""
    import json

    from datasets import Dataset, Image

    rows = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()][:N_RECORDS]
    ds = Dataset.from_list([
        {"ds_name": "shapes", "image": {"bytes": (world / r["image"]).read_bytes(), "path": None},
         "question": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "origin_dataset": "shapes",
         "origin_split": "{}", "idx": str(i), "image_path": f"shapes/{i}.png"} for i, r in enumerate(rows)
    ]).cast_column("image", Image())
    path.parent.mkdir(parents=True)
    ds.to_parquet(str(path))


@pytest.fixture(scope="module")
def workspace(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen25vl")
    cache = root / "hub"
    write_qwen25vl_hub_cache(cache)
    clip_name = smoke_clip_hub(cache)
    _write_data(tiny_world, root)
    _write_rlaifv(tiny_world, root / RLAIFV)
    env = os.environ | hub_cache_env(cache) | {
        "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MISP_LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return root, cache, clip_name, env


@pytest.mark.slow
@pytest.mark.distributed
def test_qwen25vl_configs_run_as_shipped_under_fsdp(workspace):
    root, cache, clip_name, env = workspace
    # Tiny images: the config's pixel bounds (256..1280 tokens) at the tiny scale (4..16 tokens).
    pixels = ["--model.init_args.vlm.min_pixels=3136", "--model.init_args.vlm.max_pixels=12544"]

    _misp(root, env, "fit", "--config", str(ROOT / "configs/qwen25vl_sae.yaml"), *_sizes(clip_name),
          *RECORDS, "--trainer.devices=1", "--trainer.max_epochs=1", "--model.init_args.n_latents=64",
          "--model.init_args.top_k=8", "--data.sae_batch_size=16")
    assert (root / "runs/qwen25vl/sae/export/sae.json").is_file()

    # MISP-DPO: 4-bit nf4 + LoRA, FSDP FULL_SHARD on 2 processes, sharded checkpoints.
    config = str(_with_cpu_fsdp(ROOT / "configs/qwen25vl.yaml", root / "qwen_cpu.yaml"))
    _misp(root, env, "fit", "--config", config, *_dpo_sizes(clip_name), *pixels, *RECORDS, "--trainer.max_epochs=1")
    last = root / RUN / "checkpoints/last.ckpt"
    assert (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2
    from misp.training.fsdp import saved_model_keys

    saved = saved_model_keys(last)
    assert saved and all("lora_" in k or k.startswith("proposal.") for k in saved), sorted(saved)[:5]
    assert not any("visual" in k for k in saved)  # LoRA reached the language model only
    step_after_first = torch.load(last / "meta.pt", weights_only=False)["global_step"]
    assert step_after_first >= 1

    # Resume from `last` for a second epoch.
    _misp(root, env, "fit", "--config", config, *_dpo_sizes(clip_name), *pixels, *RECORDS, "--trainer.max_epochs=2",
          "--ckpt_path=last")
    resumed = torch.load(last / "meta.pt", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * step_after_first

    # The exported adapter reloads onto the hub base and holds the last checkpoint's adapter exactly.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(last, root / "last_full.pt")
    trained = torch.load(root / "last_full.pt", weights_only=True)["model"]
    from misp.models.vlm import VLMSpec, load_vlm

    with use_hub_cache(cache):
        model, _ = load_vlm(VLMSpec(path=HUB_REPO_ID, adapter=str(root / RUN / "export/adapter")))
    exported = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert exported and len(exported) == sum(1 for k in trained if "lora_" in k)
    for name, value in exported.items():
        torch.testing.assert_close(value.float(), trained[f"model.{name}"].float(), rtol=0, atol=0)
