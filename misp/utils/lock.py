"""An exclusive lock on a folder that names its holder, for work two processes must not do at once.

``misp experiment`` holds its workspace's lock for the whole run: a second experiment on the same
workspace would train into the same run folders and prune checkpoints the first still reads. The lock
is an ``flock`` on ``<folder>/.lock``, which the kernel releases when the holder exits, however it
exits (even SIGKILL), so a lock is never stale. The file holds the holder's pid, host, start time and
command, which the refusal quotes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from misp.errors import UserError

LOCK_NAME = ".lock"


class FolderBusy(UserError, RuntimeError):
    """Another process holds the folder's lock."""


class FolderLock:
    """``with FolderLock(folder, command):`` holds ``folder``'s lock, or raises :class:`FolderBusy`."""

    def __init__(self, folder: str | os.PathLike, command: str = "") -> None:
        self.path = Path(folder) / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock now, or raise :class:`FolderBusy` naming its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{self.path.parent} is in use by {self.holder()}; wait for it to finish or stop "
                             "that process (two runs in one workspace would overwrite each other)") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def holder(self) -> str:
        """Who holds the lock, as the lock file says."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']} since {info['since']} ({info.get('command') or 'misp'})"
        except (OSError, ValueError, KeyError, TypeError):
            return f"another process (its lock file {self.path} names no holder yet)"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
