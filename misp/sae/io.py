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

from misp.errors import UserError
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


class SAEFormatError(UserError, ValueError):
    """An SAE export that cannot be used: unreadable, truncated, or not matching its own sae.json."""


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """The SAE saved in ``path`` and its metadata (``identity``, ``config`` and the extras).

    Raises:
        FileNotFoundError: ``path`` lacks sae.json or sae.safetensors.
        SAEFormatError: sae.json is not valid or its config is refused; the weights file is truncated or
            not safetensors; the weights' names or shapes differ from the config's (a dimension in sae.json
            that is not the weights'). The message names the file.
    """
    path = Path(path)
    meta_path, weights = path / "sae.json", path / "sae.safetensors"
    if not meta_path.exists() or not weights.exists():
        raise FileNotFoundError(
            f"{path} is not a saved SAE (needs sae.json and sae.safetensors); train one with "
            "`misp fit --config configs/shapes/sae.yaml`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        config = SAEConfig(**meta["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise SAEFormatError(f"SAE {meta_path}: not a valid sae.json ({type(e).__name__}: {e})") from None
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError or others
        raise SAEFormatError(
            f"SAE {weights}: cannot be read ({type(e).__name__}: {e}); the file is truncated or not safetensors: "
            "export the SAE again"
        ) from None
    sae = SparseAutoencoder(config)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = [f"{k}: sae.json makes {expected.get(k)}, the weights hold {found.get(k)}"
                for k in sorted(expected.keys() | found.keys()) if expected.get(k) != found.get(k)]
        raise SAEFormatError(f"SAE {path}: the weights do not match the config in sae.json ({'; '.join(diff[:4])})")
    sae.load_state_dict(state)
    sae.eval()
    return sae, meta
