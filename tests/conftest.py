"""Test-wide settings: offline hubs, offline W&B, a small Shapes world shared by the slower tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small Shapes world written once per test session (a few hundred images)."""
    from misp.data.world import WorldConfig, write_world

    out = tmp_path_factory.mktemp("world")
    config = WorldConfig(seed=0, n_clip=320, n_sft=160, n_pref=48, n_pool=120, n_test=24)
    write_world(out, config, progress=False)
    return out
