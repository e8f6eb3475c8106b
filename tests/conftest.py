"""Test-wide settings: offline hubs, offline W&B, a small Shapes world shared by the slower tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("USE_HUB_KERNELS", "NO")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small Shapes world written once per test session (a few hundred images)."""
    from misp.smoke import smoke_world

    return smoke_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A saved tiny CLIP (random weights) that ClipSpec(checkpoint=...) loads."""
    from misp.smoke import smoke_clip

    return smoke_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def vlm_dir(tiny_world, tmp_path_factory):
    """A saved tiny LLaVA over the tiny world's vocabulary, standing in for an SFT export."""
    from misp.smoke import smoke_vlm

    return smoke_vlm(tiny_world, tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="session")
def vlm64_dir(tiny_world, tmp_path_factory):
    """A saved tiny LLaVA whose widths bitsandbytes' CPU 4-bit kernels accept."""
    from misp.smoke import smoke_vlm

    return smoke_vlm(tiny_world, tmp_path_factory.mktemp("vlm64"), four_bit_ready=True)


@pytest.fixture(scope="session")
def sae_dir(clip_dir, tmp_path_factory):
    """A saved SAE (random weights) in the joint embedding of `clip_dir`, for the sae negative source."""
    from misp.smoke import smoke_sae

    return smoke_sae(clip_dir, tmp_path_factory.mktemp("sae"))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A tiny random-weight Qwen2.5-VL saved in the hub's file layout (misp.testing.qwen25vl)."""
    from misp.testing.qwen25vl import build_qwen25vl, save_qwen25vl_hub_files

    folder = tmp_path_factory.mktemp("qwen25vl")
    model, processor = build_qwen25vl()
    save_qwen25vl_hub_files(model, processor, folder)
    return folder
