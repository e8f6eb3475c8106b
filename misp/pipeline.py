"""Resumable chains of ``misp`` commands, shared by ``make demo`` and ``misp experiment``.

A ``Stage`` is one ``misp`` command line and the file it leaves when it has finished. A stage is done
when that file exists and a stamp beside the run records the same fingerprint (the command line and the
contents of every ``--config`` file it names) as now; so an interrupted chain resumes where it stopped,
and a stage whose command or config changed reruns. Each stage runs in its own Python process: a crash
or a leak in one cannot touch the next, and the parent holds no model.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from misp.utils.io import atomic_write_text


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


def fingerprint(stage: Stage, cwd: Path = Path(".")) -> str:
    """sha256 of the stage's command line and of the config files it names."""
    h = hashlib.sha256(json.dumps(stage.args).encode())
    for flag, value in zip(stage.args, stage.args[1:], strict=False):
        if flag == "--config":
            h.update((cwd / value).read_bytes())
    return h.hexdigest()


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
        subprocess.run(cmd, check=True, cwd=self.cwd)
        atomic_write_text(self.stamp_path(stage), stamp + "\n")
        print(f"[{self.label}] {stage.name}: finished in {time.perf_counter() - start:.0f} s", flush=True)
        return True
