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


SMALL_LLAVA = dict(image_size=32, patch_size=8, vision_hidden_size=32, vision_heads=2, text_hidden_size=64,
                   text_heads=2, text_intermediate_size=128, max_position_embeddings=256)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A saved tiny CLIP (random weights) that ClipSpec(checkpoint=...) loads."""
    from misp.models.clip import TinyClipConfig, build_tiny_clip, save_clip

    out = tmp_path_factory.mktemp("clip")
    save_clip(build_tiny_clip(TinyClipConfig(vision_width=32, text_width=32, embed_dim=16, image_size=32)), out)
    return out


@pytest.fixture(scope="session")
def vlm_dir(tiny_world, tmp_path_factory):
    """A saved tiny LLaVA over the tiny world's vocabulary, standing in for an SFT export."""
    import json

    from misp.models.tiny_llava import TinyLlavaConfig, build_tiny_llava
    from misp.models.vlm import save_vlm

    words = json.loads((tiny_world / "world.json").read_text())["vocabulary"]
    model, processor = build_tiny_llava(words, TinyLlavaConfig(**SMALL_LLAVA))
    out = tmp_path_factory.mktemp("vlm")
    save_vlm(model, processor, out)
    return out


@pytest.fixture(scope="session")
def sae_dir(tiny_world, clip_dir, tmp_path_factory):
    """A saved SAE (random weights) in the joint embedding of `clip_dir`, for the sae negative source."""
    from misp.models.clip import ClipSpec, load_clip
    from misp.negatives.projection import make_joint_embedding
    from misp.sae.io import save_sae
    from misp.sae.model import SAEConfig, SparseAutoencoder

    clip = load_clip(ClipSpec(checkpoint=str(clip_dir)))
    d = clip.model.text_projection.shape[1] if hasattr(clip.model, "text_projection") else 16
    joint = make_joint_embedding(d, d)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sae")
    save_sae(SparseAutoencoder(SAEConfig(d_in=joint.dim, n_latents=32, k=4)), out, {"joint": joint.metadata()})
    return out


@pytest.fixture(scope="session")
def vlm64_dir(tiny_world, tmp_path_factory):
    """A saved tiny LLaVA whose widths are multiples of 64, as bitsandbytes' CPU 4-bit kernels need."""
    import json

    from misp.models.tiny_llava import TinyLlavaConfig, build_tiny_llava
    from misp.models.vlm import save_vlm

    words = json.loads((tiny_world / "world.json").read_text())["vocabulary"]
    config = TinyLlavaConfig(image_size=32, patch_size=8, vision_hidden_size=64, vision_heads=2, text_hidden_size=64,
                             text_heads=2, text_intermediate_size=128, max_position_embeddings=256)
    model, processor = build_tiny_llava(words, config)
    out = tmp_path_factory.mktemp("vlm64")
    save_vlm(model, processor, out)
    return out
