"""The real-model path: configs/llava_sae.yaml and configs/llava.yaml as shipped, on a tiny LLaVA-1.5.

The model is a random-weight ``llava-hf/llava-1.5-7b-hf`` in its real architecture (336 px CLIP tower,
576 image tokens, Llama decoder, the hub's processor and chat template) stored in an offline hub cache, so
``vlm.path: llava-hf/llava-1.5-7b-hf`` resolves unchanged; a tiny open_clip stands in for ViT-L-14 through
the same pretrained path. The data are the tiny Shapes world written in the layouts the config reads
(mDPO's JSON array with ``images/...`` paths, a folder of pool images, an official-layout POPE file), at
the config's own relative paths, so no path is overridden.

What differs from a GPU run, and only that: sizes (epochs, steps, candidates, latents, tokens generated,
checkpoint interval), devices (CPU, 2 gloo processes, no dataloader workers) and, for FSDP on CPU, the
strategy's class: ``cpu_fsdp.CPUFSDPStrategy`` is misp's ``FSDPStrategy`` with FSDP's device set to the CPU
and Lightning's CUDA autocast done on the CPU. Its arguments (wrap policy, activation checkpointing,
FULL_SHARD, sharded checkpoints) and bf16-mixed precision are the config's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from misp.models.hub_cache import hub_cache_env, use_hub_cache
from misp.models.llava15 import HUB_REPO_ID
from misp.smoke import smoke_clip_hub, smoke_llava15_hub

ROOT = Path(__file__).resolve().parents[2]
RUN = Path("runs/llava/misp_dpo")
N_RECORDS = 16


def _write_data(world: Path, root: Path) -> None:
    """The tiny world in the files and layouts configs/llava*.yaml read, at their paths under ``root``."""
    prefs = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()][:N_RECORDS]
    images = root / "data/mdpo/images"
    images.mkdir(parents=True)
    mdpo = []
    for r in prefs:
        name = Path(r["image"]).name
        shutil.copy(world / r["image"], images / name)
        # mDPO's records: no id, the chat template and <image> in the prompt, "images/..." paths.
        mdpo.append({"img_path": f"images/{name}", "prompt": f"USER: <image>\n{r['prompt']} ASSISTANT:",
                     "chosen": r["chosen"], "rejected": r["rejected"]})
    (root / "data/mdpo/vlfeedback_llava_10k.json").write_text(json.dumps(mdpo))
    pool = root / "data/coco/train2017"
    pool.mkdir(parents=True)
    for line in (world / "pool.jsonl").read_text().splitlines()[:60]:
        shutil.copy(world / json.loads(line)["image"], pool)
    val = root / "data/coco/val2014"
    val.mkdir(parents=True)
    pope = []
    for i, line in enumerate((world / "pope.jsonl").read_text().splitlines()):
        q = json.loads(line)
        if q["split"] != "adversarial":
            continue
        shutil.copy(world / q["image"], val)
        pope.append({"question_id": i, "image": Path(q["image"]).name, "text": q["question"], "label": q["label"]})
    (root / "data/pope").mkdir(parents=True)
    (root / "data/pope/coco_pope_adversarial.json").write_text("".join(json.dumps(q) + "\n" for q in pope[:6]))


def _with_cpu_fsdp(config: Path, out: Path) -> Path:
    """The shipped config with its strategy's class swapped for the CPU test subclass and a checkpoint
    every step (lists of callbacks cannot be overridden item by item on the command line)."""
    data = yaml.safe_load(config.read_text())
    assert data["trainer"]["strategy"]["class_path"] == "misp.training.FSDPStrategy"
    data["trainer"]["strategy"]["class_path"] = "cpu_fsdp.CPUFSDPStrategy"
    checkpoint = data["trainer"]["callbacks"][0]
    assert checkpoint["class_path"].endswith("ModelCheckpoint")
    checkpoint["init_args"]["every_n_train_steps"] = 1
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def workspace(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    cache = root / "hub"
    smoke_llava15_hub(cache)
    clip_name = smoke_clip_hub(cache)
    _write_data(tiny_world, root)
    env = os.environ | hub_cache_env(cache) | {
        "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MISP_LOG_LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return root, cache, clip_name, env


def _misp(root: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "misp.cli", *args], cwd=root, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, f"misp {' '.join(args[:3])} failed:\n{run.stderr[-6000:]}"
    return run


def _sizes(clip_name: str) -> list[str]:
    """Sizes and devices of both configs (no path, no method setting)."""
    return [
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--data.clip.model_name={clip_name}", "--data.mining.device=cpu", "--data.mining.n_candidates=8",
        "--data.mining.pool_size=4", "--data.mining.dup_threshold=0.99999", "--data.num_workers=0",
        "--data.progress=false",
    ]


def _dpo_sizes(clip_name: str) -> list[str]:
    return _sizes(clip_name) + [
        "--trainer.devices=2", "--trainer.val_check_interval=1.0", "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--model.init_args.generation.max_new_tokens=6", "--data.evaluation.limit=6", "--data.preview_records=0",
    ]


@pytest.mark.slow
@pytest.mark.distributed
def test_llava_configs_run_as_shipped_under_fsdp(workspace):
    root, cache, clip_name, env = workspace

    # 1. The SAE of configs/llava_sae.yaml: mining (ViT-L-sized joint embedding projected to 4096), fit, export.
    _misp(root, env, "fit", "--config", str(ROOT / "configs/llava_sae.yaml"), *_sizes(clip_name),
          "--trainer.devices=1", "--trainer.max_epochs=2", "--model.init_args.n_latents=64",
          "--model.init_args.top_k=8", "--data.sae_batch_size=16")
    sae_meta = json.loads((root / "runs/llava/sae/export/sae.json").read_text())
    assert "4096" in json.dumps(sae_meta)  # the joint embedding went through the random projection

    # 2. MISP-DPO of configs/llava.yaml: 4-bit nf4 + LoRA, FSDP FULL_SHARD on 2 processes, sharded checkpoints.
    config = str(_with_cpu_fsdp(ROOT / "configs/llava.yaml", root / "llava_cpu.yaml"))
    _misp(root, env, "fit", "--config", config, *_dpo_sizes(clip_name), "--trainer.max_epochs=1")
    last = root / RUN / "checkpoints/last.ckpt"
    assert (last / ".metadata").is_file() and len(list(last.glob("*.distcp"))) == 2  # one shard per rank
    from misp.training.fsdp import saved_model_keys

    saved = saved_model_keys(last)
    # Only what trains: the LoRA adapters and q_phi; the 4-bit base is reloaded from its path.
    assert saved and all("lora_" in k or k.startswith("proposal.") for k in saved), sorted(saved)[:5]
    assert {"proposal.w", "proposal.log_tau"} <= saved
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["reference_cache"]["values"]  # the reference log-probs travel with the checkpoint
    step_after_first = meta["global_step"]
    assert step_after_first >= 1

    # 3. Resume from `last` for a second epoch (fresh negatives, the proposal and optimiser restored).
    _misp(root, env, "fit", "--config", config, *_dpo_sizes(clip_name), "--trainer.max_epochs=2", "--ckpt_path=last")
    resumed = torch.load(last / "meta.pt", weights_only=False)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * step_after_first

    # 4. The gathered export (the adapter; the 4-bit base cannot be merged) reloads onto the hub base and
    #    holds exactly the trained adapter of the last checkpoint.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(last, root / "last_full.pt")
    trained = torch.load(root / "last_full.pt", weights_only=True)["model"]
    from misp.models.vlm import VLMSpec, load_vlm

    adapter = root / RUN / "export/adapter"
    with use_hub_cache(cache):
        model, processor = load_vlm(VLMSpec(path=HUB_REPO_ID, adapter=str(adapter)))
    exported = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(exported) == sum(1 for k in trained if "lora_" in k)
    # bf16-mixed keeps the adapters in float32 (bf16-true would round most lr-1e-5 updates away).
    assert all(v.dtype == torch.float32 for k, v in trained.items() if "lora_" in k)
    for name, value in exported.items():
        torch.testing.assert_close(value.float(), trained[f"model.{name}"].float(), rtol=0, atol=0)
    assert processor.tokenizer.name_or_path  # the processor travels with the export

    # 5. `misp test --ckpt_path last.ckpt` under the same FSDP strategy: POPE (and CHAIR) on the eval set.
    _misp(root, env, "test", "--config", config, *_dpo_sizes(clip_name), f"--ckpt_path={last}")
    results = json.loads((root / RUN / "test_results.json").read_text())
    assert 0.0 <= results["pope/adversarial/accuracy"] <= 1.0

    # 6. POPE from the reloaded export alone (one process): the base from the hub id plus the exported adapter.
    _misp(root, env, "test", "--config", config, *_sizes(clip_name), "--trainer.devices=1",
          "--trainer.strategy=auto", f"--model.init_args.vlm.adapter={adapter}",
          "--model.init_args.generation.max_new_tokens=6", "--data.evaluation.limit=6")
    exported_results = json.loads((root / RUN / "test_results.json").read_text())
    assert "pope/adversarial/accuracy" in exported_results
