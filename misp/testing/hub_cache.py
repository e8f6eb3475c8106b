"""Publish a folder of files into a Hugging Face hub cache, as ``huggingface_hub`` would have downloaded it.

A real run reads ``llava-hf/llava-1.5-7b-hf`` and open_clip's weights from the hub cache with
``HF_HUB_OFFLINE=1``. Tests and device checks put stand-ins in the same place, in the same layout, so that
the code under test resolves them exactly as it would resolve the downloads::

    <cache_dir>/models--<org>--<name>/
        refs/main                    the snapshot's commit hash (40 hex digits)
        blobs/<hash>                 one file per distinct content (sha256 for LFS files, git sha1 otherwise)
        snapshots/<commit>/<path>    relative symlinks into blobs/

``HF_HUB_CACHE`` is read by ``huggingface_hub`` once, at import: a subprocess gets it from
``hub_cache_env``; an already running process switches with ``use_hub_cache``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".msgpack", ".h5")
"""Files the hub stores through Git LFS: their blob is named by the content's sha256 (others by git's sha1)."""


def repo_folder_name(repo_id: str) -> str:
    """The cache folder of a model repo: ``org/name`` -> ``models--org--name`` (huggingface_hub's naming)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must be 'org/name', got {repo_id!r}")
    return "models--" + repo_id.replace("/", "--")


def _blob_name(path: Path) -> str:
    data = path.read_bytes()
    if path.name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    # A git blob id: sha1 over "blob <size>\0" + content, as the hub names non-LFS blobs.
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def publish_snapshot(files_dir: str | os.PathLike, cache_dir: str | os.PathLike, repo_id: str) -> Path:
    """Move the files under ``files_dir`` into ``cache_dir`` as the ``main`` snapshot of ``repo_id``.

    The commit hash is derived from the files' names and contents, so the same files give the same
    snapshot. An earlier snapshot of the repo stays in the cache, but ``refs/main`` points at this one.

    Args:
        files_dir: a folder holding the repo's files (subfolders allowed); emptied by the move.
        cache_dir: the hub cache root (what ``HF_HUB_CACHE`` names).
        repo_id: ``org/name``, e.g. ``llava-hf/llava-1.5-7b-hf``.

    Returns:
        The snapshot folder ``<cache_dir>/models--org--name/snapshots/<commit>``.
    """
    src = Path(files_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"publish_snapshot: {src} holds no files")
    repo = Path(cache_dir) / repo_folder_name(repo_id)
    blobs = {p: _blob_name(p) for p in files}
    commit = hashlib.sha1(
        "".join(f"{p.relative_to(src).as_posix()}\0{blobs[p]}\n" for p in files).encode()
    ).hexdigest()
    snapshot = repo / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo / "blobs" / blobs[p]
        if not blob.exists():
            shutil.move(str(p), blob)
        link = snapshot / p.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def hub_cache_env(cache_dir: str | os.PathLike) -> dict[str, str]:
    """Environment variables that make a new process read the hub only from ``cache_dir``, offline."""
    return {"HF_HUB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextmanager
def use_hub_cache(cache_dir: str | os.PathLike) -> Iterator[Path]:
    """Within the block, this process reads the hub from ``cache_dir`` (offline); restored afterwards.

    Sets the ``hub_cache_env`` variables and ``huggingface_hub.constants`` (which read them at import),
    so transformers' and open_clip's downloads resolve in ``cache_dir``.
    """
    from huggingface_hub import constants

    env = hub_cache_env(cache_dir)
    saved_env = {k: os.environ.get(k) for k in env}
    saved = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    os.environ.update(env)
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache_dir), True
    try:
        yield Path(cache_dir)
    finally:
        constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
