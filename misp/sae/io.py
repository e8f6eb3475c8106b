"""Saving and loading a trained sparse autoencoder as a plain directory (no Lightning needed).

Layout: ``sae.safetensors`` (weights and the dead-latent buffer) and ``sae.json`` (the SAEConfig and
whatever the trainer adds, e.g. the joint-embedding metadata the SAE was trained in).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from misp.sae.model import SAEConfig, SparseAutoencoder
from misp.utils.io import atomic_write_bytes, atomic_write_json, sha256_bytes


def save_sae(sae: SparseAutoencoder, out_dir: str | Path, extra: dict[str, Any] | None = None) -> str:
    """Write ``sae`` to ``out_dir``; returns its identity (hash of the weights), used in cache keys."""
    out = Path(out_dir)
    blob = save({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()})
    identity = sha256_bytes(blob)
    atomic_write_bytes(out / "sae.safetensors", blob)
    atomic_write_json(out / "sae.json", {"config": asdict(sae.config), "identity": identity, **(extra or {})})
    return identity


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE saved in ``path`` and its metadata (``identity``, ``config`` and the extras)."""
    path = Path(path)
    meta_path, weights = path / "sae.json", path / "sae.safetensors"
    if not meta_path.exists() or not weights.exists():
        raise FileNotFoundError(
            f"{path} is not a saved SAE (needs sae.json and sae.safetensors); train one with "
            "`misp fit --config configs/shapes/sae.yaml`"
        )
    meta = json.loads(meta_path.read_text())
    sae = SparseAutoencoder(SAEConfig(**meta["config"]))
    sae.load_state_dict(load_file(str(weights)))
    sae.eval()
    return sae, meta
