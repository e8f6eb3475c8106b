"""CLIP models through open_clip: a pretrained one, a saved checkpoint, or a tiny one built offline.

The negative miner embeds images and prompts with CLIP (method.md section 2) and the CLIP-DPO stage
scores responses with it. For real runs that is a pretrained open_clip model (e.g. ViT-L-14/openai);
for the Shapes world misp trains a tiny CLIP (``build_tiny_clip``) and saves it with ``save_clip`` in
open_clip's own local folder layout, so ``open_clip.create_model_and_transforms("local-dir:DIR")``
loads it too. The tokenizer is open_clip's bundled BPE ``SimpleTokenizer``: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from safetensors.torch import save as safetensors_save
from torch import nn

from misp.utils.io import atomic_write_bytes, atomic_write_json, sha256_json

CONFIG_FILE = "open_clip_config.json"
"""open_clip's config file name in a local model folder (``local-dir:`` schema)."""
WEIGHTS_FILE = "open_clip_model.safetensors"
"""open_clip's preferred weights file name in a local model folder."""
_BPE_VOCAB_SIZE = 49408  # the bundled SimpleTokenizer's vocabulary


@dataclass
class TinyClipConfig:
    """Sizes of the tiny ViT CLIP for the Shapes world (about 7M parameters, most in the BPE embedding)."""

    image_size: int = 64
    """Side of the square input image in pixels."""
    patch_size: int = 8
    """Side of a vision patch in pixels."""
    vision_width: int = 128
    """Width of the vision transformer."""
    vision_layers: int = 2
    """Number of vision transformer layers."""
    vision_heads: int = 4
    """Attention heads of the vision transformer."""
    text_width: int = 128
    """Width of the text transformer."""
    text_layers: int = 2
    """Number of text transformer layers."""
    text_heads: int = 4
    """Attention heads of the text transformer."""
    context_length: int = 32
    """Text tokens per caption (longer captions are cut by the tokenizer)."""
    embed_dim: int = 64
    """Dimension of the joint image-text embedding space."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_width and text_width must be divisible by their head counts")
        for name in ("vision_layers", "text_layers", "context_length", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyClipConfig.{name} must be positive, got {getattr(self, name)}")

    def model_cfg(self) -> dict[str, Any]:
        """The open_clip ``model_cfg`` of this architecture (the ``CLIP`` constructor's arguments)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_width // self.vision_heads,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": _BPE_VOCAB_SIZE,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


@dataclass
class ClipSpec:
    """Which CLIP to load: exactly one of a saved checkpoint, a pretrained open_clip model, or the tiny one."""

    checkpoint: str | None = None
    """A folder written by ``save_clip`` (open_clip's local-dir layout)."""
    pretrained: str | None = None
    """open_clip pretrained tag, e.g. "openai"; needs model_name. Weights come from the local cache."""
    model_name: str | None = None
    """open_clip architecture name for ``pretrained``, e.g. "ViT-L-14"."""
    tiny: TinyClipConfig | None = None
    """Build a tiny randomly initialised CLIP with these sizes."""

    def __post_init__(self) -> None:
        chosen = [n for n in ("checkpoint", "pretrained", "tiny") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"ClipSpec needs exactly one of checkpoint, pretrained and tiny; got {chosen or 'none'}")
        if (self.pretrained is None) != (self.model_name is None):
            raise ValueError("ClipSpec: pretrained and model_name go together (e.g. model_name='ViT-L-14', pretrained='openai')")


@dataclass
class ClipBundle:
    """An open_clip model with what it takes to use it."""

    model: nn.Module
    """The open_clip ``CLIP`` module (``encode_image``, ``encode_text``, ``logit_scale``)."""
    preprocess: Callable
    """Evaluation transform: PIL image -> float tensor [3, H, W]."""
    tokenizer: Callable
    """Texts -> LongTensor [N, context_length]."""
    identity: str
    """Stable id for cache keys: a hash of config and weights (tiny, checkpoint) or "model_name/pretrained"."""
    model_cfg: dict = field(default_factory=dict)
    """open_clip ``model_cfg`` of the architecture (written by ``save_clip``)."""


def weights_identity(model: nn.Module, model_cfg: dict, preprocess_cfg: dict) -> str:
    """sha256 over the architecture, the preprocessing and every tensor of the state dict (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(sha256_json({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _preprocess_cfg(model: nn.Module) -> dict[str, Any]:
    """The model's preprocessing config in one canonical JSON form (open_clip itself stores the size as
    an int or as (h, w) depending on how the model was made)."""
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in open_clip.get_model_preprocess_cfg(model).items()}
    if isinstance(cfg.get("size"), int):
        cfg["size"] = [cfg["size"], cfg["size"]]
    return cfg


def _eval_transform(model: nn.Module) -> Callable:
    return image_transform_v2(PreprocessCfg(**_preprocess_cfg(model)), is_train=False)


def train_transform(bundle: ClipBundle, aug_cfg: dict | AugmentationCfg | None = None) -> Callable:
    """open_clip's training transform for the bundle's preprocessing (random resized crop, then normalise).

    Args:
        bundle: the CLIP being trained.
        aug_cfg: open_clip augmentation settings (e.g. ``{"scale": (0.9, 1.0)}``); None for its defaults.
    """
    return image_transform_v2(PreprocessCfg(**_preprocess_cfg(bundle.model)), is_train=True, aug_cfg=aug_cfg)


def build_tiny_clip(config: TinyClipConfig | None = None) -> ClipBundle:
    """A freshly initialised tiny CLIP (seeded), in eval mode on the CPU."""
    config = config or TinyClipConfig()
    model_cfg = config.model_cfg()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = open_clip.CLIP(**model_cfg)
    open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=config.image_size)))
    model.eval()
    return ClipBundle(
        model=model,
        preprocess=_eval_transform(model),
        tokenizer=open_clip.SimpleTokenizer(context_length=config.context_length),
        identity=weights_identity(model, model_cfg, _preprocess_cfg(model)),
        model_cfg=model_cfg,
    )


def _load_checkpoint(path: str) -> ClipBundle:
    folder = Path(path).expanduser()
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {str(folder)!r} has no {CONFIG_FILE}; pass a folder written by save_clip"
            + ("" if folder.is_dir() else " (the folder does not exist)")
        )
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"CLIP checkpoint {str(folder)!r} has no {WEIGHTS_FILE}")
    saved = json.loads(config_file.read_text())
    name = f"local-dir:{folder}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    model_cfg = saved["model_cfg"]
    identity = weights_identity(model, model_cfg, _preprocess_cfg(model))
    recorded = saved.get("misp", {}).get("identity")
    if recorded is not None and recorded != identity:
        raise ValueError(
            f"CLIP checkpoint {str(folder)!r} does not match the identity recorded when it was saved "
            "(weights or config changed or corrupt); save it again with save_clip"
        )
    return ClipBundle(model, preprocess, open_clip.get_tokenizer(name), identity, model_cfg)


def _load_pretrained(model_name: str, pretrained: str) -> ClipBundle:
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    except (RuntimeError, OSError) as e:
        raise RuntimeError(
            f"could not load open_clip {model_name!r} with pretrained={pretrained!r}: {e}. HF_HUB_OFFLINE is set in "
            "misp runs, so the weights must be in the local cache: download them first on a machine with internet"
        ) from e
    model.eval()
    model_cfg = open_clip.get_model_config(model_name) or {}
    return ClipBundle(model, preprocess, open_clip.get_tokenizer(model_name), f"{model_name}/{pretrained}", model_cfg)


def load_clip(spec: ClipSpec, device: str | torch.device = "cpu") -> ClipBundle:
    """Build or load the CLIP that ``spec`` names, in eval mode on ``device``."""
    if spec.tiny is not None:
        bundle = build_tiny_clip(spec.tiny)
    elif spec.checkpoint is not None:
        bundle = _load_checkpoint(spec.checkpoint)
    else:
        bundle = _load_pretrained(spec.model_name, spec.pretrained)
    bundle.model.to(device)
    return bundle


def save_clip(bundle: ClipBundle, out_dir: str | os.PathLike) -> Path:
    """Write ``bundle`` as an open_clip local folder: ``open_clip_config.json`` + ``open_clip_model.safetensors``.

    ``ClipSpec(checkpoint=out_dir)`` loads it, and so does ``open_clip.create_model_and_transforms(
    "local-dir:" + out_dir)``. The identity recorded alongside is checked on load, and ``bundle.identity``
    is updated to it (training changes the weights, so the identity from build time no longer holds).
    """
    if not bundle.model_cfg:
        raise ValueError("save_clip: the bundle has no model_cfg, so open_clip could not rebuild the architecture")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = bundle.model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    preprocess_cfg = _preprocess_cfg(model)
    identity = weights_identity(model, bundle.model_cfg, preprocess_cfg)
    # Weights first, config last: a folder with a config is complete.
    atomic_write_bytes(out / WEIGHTS_FILE, safetensors_save(state))
    atomic_write_json(
        out / CONFIG_FILE,
        {"model_cfg": bundle.model_cfg, "preprocess_cfg": preprocess_cfg, "misp": {"identity": identity}},
    )
    bundle.identity = identity
    return out
