"""Tiny stand-ins for every artifact of the Shapes pipeline, built in seconds.

The tests and the notebooks' smoke mode use them in place of the trained exports: a small world, a
random-init CLIP, a tiny LLaVA over the world's vocabulary, and an SAE in that CLIP's joint embedding.
They exercise every code path with the real file formats; their numbers mean nothing.

For the real-model path (configs/llava.yaml) ``smoke_llava15_hub`` and ``smoke_clip_hub`` put tiny
stand-ins for llava-hf/llava-1.5-7b-hf and the CLIP into a Hugging Face hub cache, where an offline run
finds its downloads.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from misp.models.clip import ClipSpec, TinyClipConfig, build_tiny_clip, load_clip, save_clip
from misp.models.vlm import save_vlm
from misp.negatives.projection import make_joint_embedding
from misp.sae.io import save_sae
from misp.sae.model import SAEConfig, SparseAutoencoder
from misp.testing.hub_cache import publish_snapshot
from misp.testing.llava15 import HUB_REPO_ID, Llava15Sizes, build_llava15, write_hub_cache
from misp.testing.tiny_llava import TinyLlavaConfig, build_tiny_llava
from misp.world import WorldConfig, write_world

SMOKE_WORLD = dict(seed=0, n_clip=320, n_sft=160, n_pref=48, n_pool=120, n_test=24, n_val=24)
SMOKE_CLIP = dict(vision_width=32, text_width=32, embed_dim=16, image_size=32)
SMOKE_LLAVA = dict(image_size=32, patch_size=8, vision_hidden_size=32, vision_heads=2, text_hidden_size=64,
                   text_heads=2, text_intermediate_size=128, max_position_embeddings=256)
# bitsandbytes' CPU 4-bit kernels need widths that are multiples of 64.
SMOKE_LLAVA_4BIT = SMOKE_LLAVA | dict(vision_hidden_size=64)
# The CLIP stand-in: embed_dim 128 makes the joint embedding 128 * 128 = 16384 > 4096 wide, so mining with
# configs/llava.yaml's proj_dim 4096 takes the random-projection path, as ViT-L-14 (768 * 768) does.
SMOKE_CLIP_HUB = dict(image_size=224, patch_size=32, vision_width=64, vision_heads=2, text_width=64, text_heads=2,
                      embed_dim=128)
SMOKE_CLIP_HUB_REPO = "misp-test/tiny-clip"
"""Hub repo of the CLIP stand-in; the model name for open_clip is ``"hf-hub:" + SMOKE_CLIP_HUB_REPO``."""


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


def smoke_llava15_hub(
    cache_dir: str | Path, sizes: Llava15Sizes | None = None, seed: int = 0, repo_id: str = HUB_REPO_ID
) -> Path:
    """A tiny random LLaVA-1.5 (real architecture, 576 image tokens) stored as ``repo_id`` in the hub cache.

    Sharded safetensors (several shards) and the hub repo's processor, tokenizer and chat-template files.
    A run then loads it by its hub id, e.g. ``misp fit --config configs/llava.yaml`` unchanged in
    ``model.init_args.vlm.path``, with the environment ``misp.testing.hub_cache.hub_cache_env(cache_dir)``::

        HF_HUB_CACHE=<cache_dir> HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

    (in the test process itself: ``with use_hub_cache(cache_dir): ...``). Its widths are multiples of 64, so
    the config's 4-bit nf4 loading works on the CPU too.

    Returns:
        The snapshot folder.
    """
    model, processor = build_llava15(sizes or Llava15Sizes(), seed=seed)
    # A small shard size: the 7B checkpoint comes in several shards with an index, and so does this.
    return write_hub_cache(model, processor, cache_dir, repo_id=repo_id, max_shard_size="300KB")


def smoke_clip_hub(cache_dir: str | Path, repo_id: str = SMOKE_CLIP_HUB_REPO) -> str:
    """A tiny random CLIP (embed_dim 128) stored as ``repo_id`` in the hub cache, in open_clip's hub layout.

    It stands in for configs/llava.yaml's ``clip: {model_name: ViT-L-14, pretrained: openai}`` through
    ``load_clip``'s pretrained path (``open_clip.create_model_and_transforms(model_name, pretrained=...)``),
    whose weights come from the hub cache as the real ones do. A test overrides::

        --data.clip.model_name=hf-hub:misp-test/tiny-clip   (the returned name)
        --data.clip.pretrained=openai                        (kept; open_clip ignores a tag for hf-hub names)

    with ``HF_HUB_CACHE=<cache_dir> HF_HUB_OFFLINE=1`` as for ``smoke_llava15_hub``.

    Returns:
        The open_clip model name, ``"hf-hub:" + repo_id``.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=cache) as tmp:
        save_clip(build_tiny_clip(TinyClipConfig(**SMOKE_CLIP_HUB)), tmp)
        publish_snapshot(tmp, cache, repo_id)
    return "hf-hub:" + repo_id
