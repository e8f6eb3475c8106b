"""Atomic file writes and content hashing.

Every file misp writes that a later stage reads (caches, world files, checkpoints' sidecars) goes through
these helpers, so a run killed mid-write never leaves a truncated file behind: the data lands in a
temporary file in the same folder and is renamed over the target, which POSIX makes atomic.

The temporary file is created with mode 0600 (``mkstemp``); before the rename it gets the mode a plain
``open()`` would give: the replaced file's mode, or ``0666`` less the umask for a new file, so that a
team sharing a world or a cache through group permissions can read what misp writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from misp.errors import UserError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. Reading it means setting it, so the two calls are serialised."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode(path: str | os.PathLike) -> int:
    """The permission bits ``open(path, "w")`` would leave: the existing file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The file gets the mode a plain ``open()`` would give it (see the module docstring), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputNotWritable(UserError, OSError):
    """An output file cannot be written where the config says."""


def check_writable(path: str | os.PathLike, option: str) -> None:
    """Fail now, naming ``option``, if ``path`` could not be written later by ``atomic_write_bytes``.

    Creates the folder and a temporary file in it (removed at once), as the real write will; for runs that
    write their output only after hours of work.

    Raises:
        OutputNotWritable: the folder cannot be created or written, or ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputNotWritable(f"{option} {path}: is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise OutputNotWritable(f"{option} {path}: cannot be written ({e.strerror or e}); checked before any work") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object, independent of dict key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))


def hash_files(paths: Iterable[str | os.PathLike]) -> str:
    """One hash over the contents of many files, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()
