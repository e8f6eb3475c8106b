"""Resumable chains of ``misp`` commands, shared by ``make demo`` and ``misp experiment``.

A ``Stage`` is one ``misp`` command line and the file it leaves when it has finished. A stage is done
when that file exists and a stamp beside the run records the same fingerprint as now: the command line,
the contents of every ``--config`` file it names, and every data file those configs or the command line
name (size, modification time and a hash of the content; see :func:`data_file_signature`). So an
interrupted chain resumes where it stopped, and a stage whose command, config or data changed reruns.

Each stage runs in its own Python process: a crash or a leak in one cannot touch the next, and the
parent holds no model. A SIGTERM, SIGINT or SIGHUP the parent receives is forwarded to the running
child, which stops (a ``misp fit`` leaves its last checkpoint); the parent waits for it, so no child is
left behind, and raises :class:`misp.errors.Interrupted` (exit status ``128 + signal``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from misp.errors import Interrupted
from misp.utils.io import atomic_write_text

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals the parent passes on to the running child before it stops."""
SIGINT_GRACE_S = 10.0
"""How long a child may take to stop on the SIGINT a terminal gave it too, before the parent passes it on."""
KILL_AFTER_S = 300.0
"""How long a child may take to stop after a forwarded signal (its last checkpoint save) before SIGKILL."""
OUTPUT_OPTIONS = frozenset({"config", "ckpt_path", "output_file", "export_dir", "cache_dir", "default_root_dir",
                            "dirpath", "save_dir", "out", "report", "summary_file", "candidates_file"})
"""Option names (the last part of a key) whose files a stage writes or that are fingerprinted otherwise
(``--config`` by content, checkpoints by the chain's stamps): left out of the data files."""
HASH_WHOLE_BYTES = 64 << 20
"""Data files up to this size are hashed whole; larger ones by size, mtime and their first and last MiB."""


@dataclass
class Stage:
    name: str
    """Unique within a chain; names the stamp file."""
    args: list[str]
    """The ``misp`` arguments (``["fit", "--config", ...]``)."""
    done_when: Path
    """The file the stage leaves when it has finished (relative to the chain's working directory)."""
    resume_from: Path | None = None
    """A checkpoint the stage writes as it goes: when an earlier attempt of the same fingerprint left it,
    the stage continues from it (``--ckpt_path``) instead of starting over."""
    reads: str = ""
    """What else the stage's output depends on that its command line does not name (an experiment run: the
    stamps of the chain stages it reads, whose outputs are folders), folded into its fingerprint."""


_SIGNATURES: dict[tuple[str, int, int], str] = {}


def data_file_signature(path: Path) -> str:
    """Size, mtime and a content hash of a data file: whole up to ``HASH_WHOLE_BYTES``, else the first and
    last MiB (with size and mtime, enough to see a file rewritten). Memoised per (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SIGNATURES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if st.st_size <= HASH_WHOLE_BYTES:
                while block := f.read(1 << 20):
                    h.update(block)
            else:
                h.update(f.read(1 << 20))
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
        _SIGNATURES[key] = f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()}"
    return _SIGNATURES[key]


def _named_values(value: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _named_values(v, str(k))
    elif isinstance(value, list):
        for v in value:
            yield from _named_values(v, key)
    elif isinstance(value, str):
        yield key, value


def data_files(stage: Stage, cwd: Path = Path(".")) -> list[Path]:
    """The existing files a stage's configs and command line name as inputs (see ``OUTPUT_OPTIONS``)."""
    named: list[tuple[str, str]] = []
    args = stage.args
    for flag, value in zip(args, args[1:], strict=False):
        if flag == "--config":
            try:
                named += list(_named_values(yaml.safe_load((cwd / value).read_text(encoding="utf-8"))))
            except (yaml.YAMLError, UnicodeDecodeError):
                continue  # the stage itself reports the file; its bytes are fingerprinted anyway
        elif flag.startswith("--"):
            named.append((flag[2:], value))
    skip = {(cwd / stage.done_when).resolve()}
    if stage.resume_from is not None:
        skip.add((cwd / stage.resume_from).resolve())
    found: dict[Path, None] = {}
    for key, value in named:
        if key.rsplit(".", 1)[-1] in OUTPUT_OPTIONS or not value or "\n" in value or len(value) > 4096:
            continue
        path = cwd / os.path.expanduser(value)
        try:
            if path.is_file() and path.resolve() not in skip:
                found[path] = None
        except OSError:
            continue
    return list(found)


def fingerprint(stage: Stage, cwd: Path = Path(".")) -> str:
    """sha256 of the stage's command line, the config files it names and the data files they name."""
    h = hashlib.sha256(json.dumps(stage.args).encode())
    if stage.reads:
        h.update(stage.reads.encode())
    for flag, value in zip(stage.args, stage.args[1:], strict=False):
        if flag == "--config":
            h.update((cwd / value).read_bytes())
    for path in data_files(stage, cwd):
        h.update(f"{path}={data_file_signature(path)}".encode())
    return h.hexdigest()


def run_child(cmd: list[str], check: bool = True, cwd: str | os.PathLike | None = None) -> int:
    """Run ``cmd`` (as ``subprocess.run(cmd, check=check, cwd=cwd)``), forwarding signals to it.

    While it runs, a SIGTERM or SIGHUP this process receives is sent on to the child at once. A SIGINT is
    sent on only if the child has not stopped within ``SIGINT_GRACE_S``: Ctrl+C in a terminal reaches the
    child directly, and a second SIGINT would interrupt its own clean stop. Then the child is waited for
    (SIGKILL after ``KILL_AFTER_S``), so it is reaped and never left running.

    Raises:
        Interrupted: a signal stopped the child.
        subprocess.CalledProcessError: the command failed (``check``).
    """
    received: list[int] = []
    proc = subprocess.Popen(cmd, cwd=cwd)

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        if signum != signal.SIGINT and proc.poll() is None:
            proc.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS} if in_main else {}
    first, sigint_sent = None, False
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if not received:
                    continue
                first = first or time.monotonic()
                waited = time.monotonic() - first
                if received[0] == signal.SIGINT and waited >= SIGINT_GRACE_S and not sigint_sent:
                    proc.send_signal(signal.SIGINT)
                    sigint_sent = True
                if waited > KILL_AFTER_S:
                    proc.kill()
    finally:
        if proc.poll() is None:  # an exception other than a signal (never expected): no orphan either
            proc.kill()
            proc.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        name = signal.Signals(received[0]).name
        raise Interrupted(received[0], f"interrupted by {name}: the child {' '.join(cmd[:4])} ... stopped with exit "
                          f"status {code}; nothing unfinished is recorded, and the same command resumes")
    if check and code != 0:
        raise subprocess.CalledProcessError(code, cmd)
    return code


@dataclass
class StageRunner:
    """Runs stages in ``cwd``, stamping each finished one under ``stamps`` (relative to ``cwd``)."""

    stamps: Path
    cwd: Path = Path(".")
    label: str = "demo"
    """Prefix of the progress lines."""

    def stamp_path(self, stage: Stage) -> Path:
        """The file holding the fingerprint the stage last finished with."""
        return self.cwd / self.stamps / f"{stage.name.replace('/', '__')}.sha256"

    def _started_path(self, stage: Stage) -> Path:
        return self.stamp_path(stage).with_suffix(".started")

    def _holds(self, path: Path, stamp: str) -> bool:
        return path.exists() and path.read_text().strip() == stamp

    def is_done(self, stage: Stage, stamp: str | None = None) -> bool:
        """Its output exists and was made by the same command and config as now (``stamp``: its
        fingerprint, when the caller has it already)."""
        stamp = stamp or fingerprint(stage, self.cwd)
        return (self.cwd / stage.done_when).exists() and self._holds(self.stamp_path(stage), stamp)

    def can_resume(self, stage: Stage, stamp: str | None = None) -> bool:
        """An unfinished attempt with the same fingerprint left the stage's ``resume_from`` checkpoint."""
        stamp = stamp or fingerprint(stage, self.cwd)
        return (stage.resume_from is not None and (self.cwd / stage.resume_from).exists()
                and self._holds(self._started_path(stage), stamp))

    def run(self, stage: Stage, force: bool = False) -> bool:
        """Run the stage unless it is done (see ``is_done``) and not forced; True when it ran.

        Raises:
            subprocess.CalledProcessError: the command failed (its output went to this process's).
            Interrupted: a signal stopped it (see :func:`run_child`); it is not stamped.
        """
        stamp = fingerprint(stage, self.cwd)  # reads every config file once per call
        if not force and self.is_done(stage, stamp):
            print(f"[{self.label}] {stage.name}: done already ({stage.done_when}); skipping", flush=True)
            return False
        args = list(stage.args)
        if self.can_resume(stage, stamp):
            # Never from a checkpoint of another config: can_resume compares the fingerprints.
            args += ["--ckpt_path", str(stage.resume_from)]
        cmd = [sys.executable, "-m", "misp.cli", *args]
        print(f"[{self.label}] {stage.name}: {' '.join(['misp', *args])}", flush=True)
        start = time.perf_counter()
        atomic_write_text(self._started_path(stage), stamp + "\n")
        try:
            run_child(cmd, check=True, cwd=self.cwd)
        except Interrupted as e:
            raise Interrupted(e.signum, f"[{self.label}] stage {stage.name}: {e}") from None
        atomic_write_text(self.stamp_path(stage), stamp + "\n")
        print(f"[{self.label}] {stage.name}: finished in {time.perf_counter() - start:.0f} s", flush=True)
        return True
