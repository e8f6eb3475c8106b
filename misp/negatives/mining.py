"""Negative mining, run once per dataset: CLIP embedding, retrieval, SAE scoring, greedy selection.

Stage by stage (method.md 2 and 4.1-4.3), each cached under ``cache_dir`` (safetensors + JSON sidecar,
atomic, rebuilt when its inputs change):

1. ``mine_candidates``: CLIP embeddings of the records' images and prompts and of the pool, and for each
   record the ``n_candidates`` most similar pool images (positive and near-duplicates excluded).
2. ``select_negatives``: SAE scores of each candidate's difference vector and the greedy diverse
   selection of ``pool_size`` negatives per record, with the proposal features of method.md 4.4.

Difference vectors are never stored: ``d_i = e(m_p, x) - e(m_i, x)`` is a cheap bilinear function of
the cached embeddings (``Candidates.differences``), while materialising all ``R * N`` of them would take
``R * N * D`` floats (800 records x 64 candidates x 4096 dims = 840 MB). Records are processed in chunks
so memory stays ``O(chunk * N * (D + h))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from misp.negatives.embed import embed_images, embed_texts
from misp.negatives.projection import JointEmbedding, make_joint_embedding
from misp.negatives.retrieval import retrieve_candidates
from misp.negatives.scoring import sae_scores
from misp.negatives.selection import greedy_diverse_select, selection_features
from misp.utils.cache import cached
from misp.utils.io import sha256_json

log = logging.getLogger(__name__)


@dataclass
class MiningConfig:
    """Settings of negative retrieval and selection (method.md 4.1-4.3)."""

    n_candidates: int = 64
    """N: pool images retrieved per record by CLIP image similarity."""
    dup_threshold: float = 0.98
    """Pool images with cosine above this to the positive are near-duplicates and never negatives."""
    pool_size: int = 16
    """M: negatives kept per record by the greedy diverse selection; each epoch draws K of them."""
    beta_div: float = 0.5
    """Weight of the diversity term in the greedy selection (separate from the DPO beta)."""
    proj_dim: int = 4096
    """Dimension of the joint embedding; larger outer products are randomly projected to it."""
    proj_seed: int = 0
    """Seed of the fixed random projection."""
    embed_batch_size: int = 256
    """Images or texts per CLIP forward pass."""
    chunk_records: int = 512
    """Records scored and selected at once; bounds memory for large datasets."""
    device: str = "cpu"
    """Where CLIP, retrieval and the SAE run during mining (``cuda`` on a GPU machine)."""

    def __post_init__(self) -> None:
        # Checked here, so that a bad value fails at start-up naming its option, not deep inside retrieval.
        for name in ("n_candidates", "pool_size", "proj_dim", "embed_batch_size", "chunk_records"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"mining.{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.dup_threshold:
            raise ValueError(f"mining.dup_threshold must be positive (a cosine; above 1 keeps duplicates), got {self.dup_threshold}")
        if self.beta_div < 0:
            raise ValueError(f"mining.beta_div must be >= 0, got {self.beta_div}")


@dataclass
class Candidates:
    """Retrieved candidates of every record, with the embeddings their difference vectors come from."""

    image: torch.Tensor
    """[R, d_v] CLIP embeddings of the records' positive images."""
    text: torch.Tensor
    """[R, d_t] CLIP embeddings of the records' prompts."""
    pool: torch.Tensor
    """[P, d_v] CLIP embeddings of the pool images."""
    indices: torch.Tensor
    """[R, N] pool indices of each record's candidates, best first; -1 pads."""
    sims: torch.Tensor
    """[R, N] CLIP image cosine of each candidate to the positive; -inf pads."""
    joint: JointEmbedding
    """The joint embedding (and projection) difference vectors live in."""
    key: str
    """Hash naming these candidates' inputs, for the caches built on top of them."""

    @property
    def valid(self) -> torch.Tensor:
        return self.indices >= 0

    @property
    def dim(self) -> int:
        return self.joint.dim

    def differences(self, rows: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
        """``[r, N, D]`` difference vectors of the given records' candidates (zero on padding).

        The embeddings are gathered where they live and moved to ``device`` before the expansion to
        dimension D, so on a GPU the large ``[r, N, D]`` tensor is built there, never copied over.
        """
        device = self.pool.device if device is None else torch.device(device)
        idx = self.indices[rows]
        cand = self.pool[idx.clamp_min(0)].to(device)
        d = self.joint.differences(self.image[rows].to(device), cand, self.text[rows].to(device))
        return d * (idx >= 0).unsqueeze(-1).to(device=device, dtype=d.dtype)

    def pair_differences(self, pairs: torch.Tensor) -> torch.Tensor:
        """``[n, D]`` difference vectors of (record, candidate column) pairs ``[n, 2]``."""
        rows, cols = pairs[:, 0], pairs[:, 1]
        cand = self.pool[self.indices[rows, cols]]
        return self.joint.differences(self.image[rows], cand.unsqueeze(1), self.text[rows]).squeeze(1)

    def valid_pairs(self) -> torch.Tensor:
        """``[n, 2]`` every (record, candidate column) with a real candidate, in row-major order."""
        return self.valid.nonzero()


def _own_pool_index(record_images: list[Path], pool_paths: list[Path]) -> torch.Tensor:
    where = {p.resolve(): i for i, p in enumerate(pool_paths)}
    return torch.tensor([where.get(p.resolve(), -1) for p in record_images], dtype=torch.long)


def mine_candidates(
    record_images: list[Path],
    prompts: list[str],
    pool_paths: list[Path],
    clip,
    config: MiningConfig,
    cache_dir: str | Path,
    progress: bool = True,
) -> Candidates:
    """Embed records and pool with CLIP and retrieve each record's candidates (cached)."""
    cache_dir = Path(cache_dir)
    c = config
    image = embed_images(clip, record_images, c.embed_batch_size, cache_dir / "records_image", c.device, progress=progress)
    text = embed_texts(clip, prompts, c.embed_batch_size, cache_dir / "records_text", c.device, progress=progress)
    pool = embed_images(clip, pool_paths, c.embed_batch_size, cache_dir / "pool_image", c.device, progress=progress)
    key = {
        "kind": "retrieval",
        "records": sha256_json([str(p) for p in record_images]),
        "pool": sha256_json([str(p) for p in pool_paths]),
        "model": str(clip.identity),
        "embeddings": sha256_json([float(image.sum()), float(pool.sum()), float(text.sum())]),
        "n": c.n_candidates,
        "dup_threshold": c.dup_threshold,
    }

    def build() -> dict[str, torch.Tensor]:
        indices, sims = retrieve_candidates(
            image, pool, n=c.n_candidates, exclude_index=_own_pool_index(record_images, pool_paths),
            dup_threshold=c.dup_threshold, progress=progress, device=c.device,
        )
        return {"indices": indices, "sims": sims}

    found = cached(cache_dir / "retrieval", key, build)
    joint = make_joint_embedding(image.shape[1], text.shape[1], c.proj_dim, c.proj_seed)
    key["joint"] = joint.metadata()
    n_valid = (found["indices"] >= 0).sum(1)
    if bool((n_valid == 0).any()):
        bad = int((n_valid == 0).nonzero()[0])
        raise ValueError(
            f"record #{bad} ({record_images[bad]}) has no candidate in the pool: every pool image is a "
            f"near-duplicate (cosine > {c.dup_threshold}) or the pool is empty"
        )
    return Candidates(image, text, pool, found["indices"], found["sims"], joint, sha256_json(key))


@dataclass
class Selection:
    """The per-record negative pools chosen by the SAE (method.md 4.3) and the proposal's features."""

    pool_index: torch.Tensor
    """[R, M] pool image index of each selected negative; -1 pads records with fewer candidates."""
    features: torch.Tensor
    """[R, M, 4] proposal features [l/max l, v/max v, diversity gain, CLIP cosine]."""
    scores: torch.Tensor
    """[R, M] the combined SAE score s of each selected negative."""
    gains: torch.Tensor
    """[R, M] diversity gain at selection."""

    @property
    def valid(self) -> torch.Tensor:
        return self.pool_index >= 0


def select_chunk(
    candidates: Candidates, rows: torch.Tensor, valid: torch.Tensor, scores: dict[str, torch.Tensor], m: int,
    beta_div: float,
) -> dict[str, torch.Tensor]:
    """Greedy diverse selection for the records ``rows`` from their SAE ``scores`` (``sae_scores``'s output).

    Returns CPU tensors: ``pool_index [r, m]`` (-1 pads), ``features [r, m, 4]``, ``scores [r, m]``, ``gains [r, m]``.
    """
    device = valid.device
    idx, gains = greedy_diverse_select(scores["s"], scores["z"], valid, m, beta_div)
    sims = candidates.sims[rows].to(device).clamp_min(-1.0)
    features = selection_features(scores["l"], scores["v"], gains, sims, idx, valid)
    chosen = idx >= 0
    at = idx.clamp_min(0)
    return {
        "pool_index": torch.where(chosen, candidates.indices[rows].to(device).gather(1, at), -1).cpu(),
        "features": features.float().cpu(),
        "scores": torch.where(chosen, scores["s"].gather(1, at), 0.0).float().cpu(),
        "gains": gains.float().cpu(),
    }


@torch.no_grad()
def select_negatives(
    candidates: Candidates,
    sae: torch.nn.Module,
    sae_identity: str,
    config: MiningConfig,
    cache_dir: str | Path,
    progress: bool = True,
) -> Selection:
    """Score every candidate with the SAE and greedily select ``pool_size`` diverse negatives (cached)."""
    c = config
    key = {
        "kind": "selection",
        "candidates": candidates.key,
        "sae": sae_identity,
        "m": c.pool_size,
        "beta_div": c.beta_div,
    }

    def build() -> dict[str, torch.Tensor]:
        sae.eval()
        device = torch.device(c.device)
        sae.to(device)
        out: dict[str, list[torch.Tensor]] = {"pool_index": [], "features": [], "scores": [], "gains": []}
        n = candidates.indices.shape[0]
        for start in tqdm(range(0, n, c.chunk_records), desc="SAE scoring", disable=not progress, unit="chunk"):
            rows = torch.arange(start, min(start + c.chunk_records, n))
            valid = candidates.valid[rows].to(device)
            d = candidates.differences(rows, device)
            chunk = select_chunk(candidates, rows, valid, sae_scores(sae, d, valid), c.pool_size, c.beta_div)
            for k, v in chunk.items():
                out[k].append(v)
        return {k: torch.cat(v) for k, v in out.items()}

    found = cached(Path(cache_dir) / f"selection_m{c.pool_size}", key, build)
    return Selection(found["pool_index"], found["features"], found["scores"], found["gains"])
