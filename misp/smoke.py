"""Tiny stand-ins for every artifact of the Shapes pipeline, built in seconds.

The tests and the notebooks' smoke mode use them in place of the trained exports: a small world, a
random-init CLIP, a tiny LLaVA over the world's vocabulary, and an SAE in that CLIP's joint embedding.
They exercise every code path with the real file formats; their numbers mean nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from misp.data.world import WorldConfig, write_world
from misp.models.clip import ClipSpec, TinyClipConfig, build_tiny_clip, load_clip, save_clip
from misp.models.tiny_llava import TinyLlavaConfig, build_tiny_llava
from misp.models.vlm import save_vlm
from misp.negatives.projection import make_joint_embedding
from misp.sae.io import save_sae
from misp.sae.model import SAEConfig, SparseAutoencoder

SMOKE_WORLD = dict(seed=0, n_clip=320, n_sft=160, n_pref=48, n_pool=120, n_test=24)
SMOKE_CLIP = dict(vision_width=32, text_width=32, embed_dim=16, image_size=32)
SMOKE_LLAVA = dict(image_size=32, patch_size=8, vision_hidden_size=32, vision_heads=2, text_hidden_size=64,
                   text_heads=2, text_intermediate_size=128, max_position_embeddings=256)
# bitsandbytes' CPU 4-bit kernels need widths that are multiples of 64.
SMOKE_LLAVA_4BIT = SMOKE_LLAVA | dict(vision_hidden_size=64)


@dataclass
class SmokeArtifacts:
    world: Path
    clip: Path
    vlm: Path
    sae: Path


def smoke_world(out: Path) -> Path:
    write_world(out, WorldConfig(**SMOKE_WORLD), progress=False)
    return out


def smoke_clip(out: Path) -> Path:
    save_clip(build_tiny_clip(TinyClipConfig(**SMOKE_CLIP)), out)
    return out


def smoke_vlm(world: Path, out: Path, four_bit_ready: bool = False) -> Path:
    words = json.loads((world / "world.json").read_text())["vocabulary"]
    model, processor = build_tiny_llava(words, TinyLlavaConfig(**(SMOKE_LLAVA_4BIT if four_bit_ready else SMOKE_LLAVA)))
    save_vlm(model, processor, out)
    return out


def smoke_sae(clip: Path, out: Path, n_latents: int = 32, k: int = 4) -> Path:
    """A random SAE whose metadata names the joint embedding of ``clip`` (as SAEModule's export does)."""
    model = load_clip(ClipSpec(checkpoint=str(clip))).model
    d = model.text_projection.shape[1]
    joint = make_joint_embedding(d, d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=joint.dim, n_latents=n_latents, k=k))
    save_sae(sae, out, {"joint": joint.metadata()})
    return out


def smoke_artifacts(root: str | Path) -> SmokeArtifacts:
    """All four under ``root`` (reused when already there)."""
    root = Path(root)
    world = root / "world"
    if not (world / "world.json").exists():
        smoke_world(world)
    clip = root / "clip" if (root / "clip/open_clip_config.json").exists() else smoke_clip(root / "clip")
    vlm = root / "vlm" if (root / "vlm/config.json").exists() else smoke_vlm(world, root / "vlm")
    sae = root / "sae" if (root / "sae/sae.json").exists() else smoke_sae(clip, root / "sae")
    return SmokeArtifacts(world, clip, vlm, sae)
