"""Negative mining, run once per dataset: CLIP embedding, retrieval, SAE scoring, greedy selection.

Stage by stage (method.md 2 and 4.1-4.3), each cached under ``cache_dir`` (safetensors + JSON sidecar,
atomic, rebuilt when its inputs change):

1. ``mine_candidates``: CLIP embeddings of the records' images and prompts and of the pool, and for each
   record the ``n_candidates`` most similar pool images (positive and near-duplicates excluded); with
   ``record_candidates`` set, the record's own images (counterfactual renders or listed negatives) join
   them (the mixed pool).
2. ``select_negatives``: SAE scores of each candidate's difference vector and the greedy diverse
   selection of ``pool_size`` negatives per record, with the proposal features of method.md 4.4.

Difference vectors are never stored: ``d_i = e(m_p, x) - e(m_i, x)`` is a cheap bilinear function of
the cached embeddings (``Candidates.differences``), while materialising all ``R * N`` of them would take
``R * N * D`` floats (800 records x 64 candidates x 4096 dims = 840 MB). Records are processed in chunks
so memory stays ``O(chunk * N * (D + h))``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    record_candidates: Literal["none", "counterfactual", "given", "edits"] = "none"
    """The record's own images that join its retrieved candidates before SAE selection (the mixed pool):
    ``counterfactual``, its one-attribute renders in ``meta.counterfactuals`` (Shapes world); ``given``,
    its ``negatives`` list (edited or near-duplicate images of real data); ``edits``, its edited images with
    their own responses (``misp.negatives.edits``: the ``edits`` field or format 6's captioned
    counterfactuals, partner edits included); ``none``, retrieved pool images
    only (method.md 4.1). They are embedded by the same CLIP, never dropped as near-duplicates, and both
    the ``sae`` source (selection and q_phi) and the ``random`` source draw from the mixed list."""

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
        if self.record_candidates not in RECORD_CANDIDATES:
            raise ValueError(
                f"mining.record_candidates must be one of {list(RECORD_CANDIDATES)}, got {self.record_candidates!r}"
            )


RECORD_CANDIDATES = ("none", "counterfactual", "given", "edits")
"""The values of ``MiningConfig.record_candidates``."""


@dataclass
class Candidates:
    """Retrieved candidates of every record, with the embeddings their difference vectors come from."""

    image: torch.Tensor
    """[R, d_v] CLIP embeddings of the records' positive images."""
    text: torch.Tensor
    """[R, d_t] CLIP embeddings of the records' prompts."""
    pool: torch.Tensor
    """[P, d_v] CLIP embeddings of the candidate images: the pool, then (``record_candidates``) the
    records' own images that are not pool images."""
    indices: torch.Tensor
    """[R, N] indices into ``pool`` (and ``paths``) of each record's candidates, best first; -1 pads."""
    sims: torch.Tensor
    """[R, N] CLIP image cosine of each candidate to the positive; -inf pads."""
    joint: JointEmbedding
    """The joint embedding (and projection) difference vectors live in."""
    key: str
    """Hash naming these candidates' inputs, for the caches built on top of them."""
    paths: list[Path] = field(default_factory=list)
    """The image file of each row of ``pool``, so an index names a file (empty when built without files)."""
    own: torch.Tensor | None = None
    """[R, O] indices of each record's own images (``record_candidates``), -1 pads; None without them."""

    def is_own(self, index: torch.Tensor) -> torch.Tensor:
        """Which entries of ``index [R, M]`` (candidate indices per record, -1 pads) are the record's own images."""
        if self.own is None:
            return torch.zeros(index.shape, dtype=torch.bool)
        return ((index[:, :, None] == self.own[:, None, :]) & (index >= 0)[:, :, None]).any(-1)

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


def own_image_index(own_images: Sequence[Sequence[Path]], pool_paths: list[Path]) -> tuple[list[Path], torch.Tensor]:
    """The records' own images as indices into the candidate image list ``pool_paths + extra``.

    Returns ``(extra, index)``: the own images that are not pool images (each once, in first-seen order)
    and ``index [R, O]`` of each record's own images (-1 pads). An own image that is also in the pool keeps
    its pool index, and one listed twice by a record counts once, so no candidate appears twice.
    """
    where = {p.resolve(): i for i, p in enumerate(pool_paths)}
    extra: list[Path] = []
    rows = []
    for images in own_images:
        row = []
        for path in map(Path, images):
            resolved = path.resolve()
            if resolved not in where:
                where[resolved] = len(pool_paths) + len(extra)
                extra.append(path)
            row.append(where[resolved])
        rows.append(list(dict.fromkeys(row)))
    index = torch.full((len(rows), max(map(len, rows), default=0)), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        index[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    return extra, index


def _row_cosines(image: torch.Tensor, images: torch.Tensor, index: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[R, O]`` cosine of each record's positive to the images ``index`` names (-inf on padding), in chunks
    of records so the gathered ``[chunk, O, d]`` embeddings stay small."""
    out = torch.full(index.shape, float("-inf"), dtype=torch.float32)
    for start in range(0, index.shape[0], chunk):
        idx = index[start : start + chunk]
        cos = torch.einsum("rd,rod->ro", image[start : start + chunk].float(), images[idx.clamp_min(0)].float())
        out[start : start + chunk] = cos.masked_fill(idx < 0, float("-inf"))
    return out


def merge_own_candidates(
    image: torch.Tensor, images: torch.Tensor, own: torch.Tensor, retrieved: torch.Tensor, sims: torch.Tensor,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each record's own images ``own [R, O]`` beside its retrieved candidates ``retrieved [R, N]``.

    Returns ``(indices, sims)`` of width ``O + N``, best first by CLIP cosine to the positive, -1 / -inf
    padding last. The own images bypass the near-duplicate filter on purpose: that filter keeps pool copies
    of the positive (false negatives) out, while an own image is an edit by construction; a one-attribute
    change can leave the CLIP cosine above ``dup_threshold``, and that closeness is what makes it a hard
    negative. A retrieved image that is also one of the record's own is kept once.
    """
    own_sims = _row_cosines(image, images, own, chunk)
    repeated = ((retrieved[:, :, None] == own[:, None, :]) & (own[:, None, :] >= 0)).any(-1)
    all_sims = torch.cat([own_sims, sims.float().masked_fill(repeated, float("-inf"))], 1)
    all_index = torch.cat([own, retrieved], 1)
    all_sims, order = all_sims.sort(dim=1, descending=True, stable=True)
    return all_index.gather(1, order).masked_fill(torch.isneginf(all_sims), -1), all_sims


def mine_candidates(
    record_images: list[Path],
    prompts: list[str],
    pool_paths: list[Path],
    clip,
    config: MiningConfig,
    cache_dir: str | Path,
    progress: bool = True,
    own_images: Sequence[Sequence[Path]] | None = None,
) -> Candidates:
    """Embed records and pool with CLIP and retrieve each record's candidates (cached).

    ``own_images``: per record, the images ``config.record_candidates`` names (required exactly when it is
    not ``none``); they join the record's retrieved candidates (``merge_own_candidates``).
    """
    cache_dir = Path(cache_dir)
    c = config
    if (own_images is not None) != (c.record_candidates != "none"):
        raise ValueError(
            f"mine_candidates: mining.record_candidates={c.record_candidates!r} needs the records' own images "
            "exactly when it is not 'none'"
        )
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

    # Retrieval reads the pool only, so its cache serves every record_candidates setting; the merge below
    # is cheap and redone each time, and the candidates' key (on which the selection cache and the SAE
    # export key) names the setting and the own images.
    found = cached(cache_dir / "retrieval", key, build)
    indices, sims, paths, own = found["indices"], found["sims"], list(pool_paths), None
    if own_images is not None:
        key["record_candidates"] = c.record_candidates
        extra, own = own_image_index(own_images, pool_paths)
        if extra:
            own_cache = cache_dir / f"records_{c.record_candidates}_image"
            pool = torch.cat([pool, embed_images(clip, extra, c.embed_batch_size, own_cache, c.device, progress=progress)])
        paths += extra
        indices, sims = merge_own_candidates(image, pool, own, indices, sims, c.chunk_records)
        key["own"] = sha256_json({"extra": [str(p) for p in extra], "index": own.tolist(), "sum": float(pool.sum())})
    joint = make_joint_embedding(image.shape[1], text.shape[1], c.proj_dim, c.proj_seed)
    key["joint"] = joint.metadata()
    n_valid = (indices >= 0).sum(1)
    if bool((n_valid == 0).any()):
        bad = int((n_valid == 0).nonzero()[0])
        raise ValueError(
            f"record #{bad} ({record_images[bad]}) has no candidate in the pool: every pool image is a "
            f"near-duplicate (cosine > {c.dup_threshold}) or the pool is empty"
        )
    return Candidates(image, text, pool, indices, sims, joint, sha256_json(key), paths, own)


@dataclass
class Selection:
    """The per-record negative pools chosen by the SAE (method.md 4.3) and the proposal's features."""

    pool_index: torch.Tensor
    """[R, M] candidate image index (into ``Candidates.paths``) of each selected negative; -1 pads records
    with fewer candidates."""
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
    beta_div: float, pinned: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Greedy diverse selection for the records ``rows`` from their SAE ``scores`` (``sae_scores``'s output);
    ``pinned [r, N]`` marks candidates chosen first (``greedy_diverse_select``).

    Returns CPU tensors: ``pool_index [r, m]`` (-1 pads), ``features [r, m, 4]``, ``scores [r, m]``, ``gains [r, m]``.
    """
    device = valid.device
    idx, gains = greedy_diverse_select(scores["s"], scores["z"], valid, m, beta_div, pinned)
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
    pinned_index: torch.Tensor | None = None,
) -> Selection:
    """Score every candidate with the SAE and greedily select ``pool_size`` diverse negatives (cached).

    ``pinned_index [R, P]`` (candidate image indices, -1 pads) names each record's candidates to keep before
    any other (the ``sae_targets`` source's target edits)."""
    c = config
    key = {
        "kind": "selection",
        "candidates": candidates.key,
        "sae": sae_identity,
        "m": c.pool_size,
        "beta_div": c.beta_div,
    }
    if pinned_index is not None:
        key["pinned"] = hashlib.sha256(pinned_index.to(torch.int64).numpy().tobytes()).hexdigest()

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
            pinned = None
            if pinned_index is not None:
                own = pinned_index[rows].to(device)
                pinned = ((candidates.indices[rows].to(device)[:, :, None] == own[:, None, :]) & (own[:, None, :] >= 0)).any(-1)
            chunk = select_chunk(candidates, rows, valid, sae_scores(sae, d, valid), c.pool_size, c.beta_div, pinned)
            for k, v in chunk.items():
                out[k].append(v)
        return {k: torch.cat(v) for k, v in out.items()}

    # One file per setting, so runs of MISP-DPO over the pool alone and over the mixed pool sharing a
    # cache_dir each keep theirs (the key alone would make them overwrite each other's).
    name = (f"selection_m{c.pool_size}" + ("" if c.record_candidates == "none" else f"_{c.record_candidates}")
            + ("" if pinned_index is None else "_pinned"))
    found = cached(Path(cache_dir) / name, key, build)
    return Selection(found["pool_index"], found["features"], found["scores"], found["gains"])
