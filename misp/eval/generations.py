"""``generations/<benchmark>.jsonl``: every answer on disk, appended batch by batch, safe to resume.

One JSON object per line: ``id``, ``prompt``, ``answer`` and ``judgement`` (what the metric counts).
Lines are appended and flushed to disk (fsync) after each batch, so a killed run loses at most the
batch in flight; a line cut short by the kill is dropped when the file is opened again, and the ids
already present are never asked again. An answer whose judge failed (``judgement`` null) is kept
and judged when the run resumes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from misp.utils.io import atomic_write_jsonl

log = logging.getLogger(__name__)


class GenerationsFile:
    """The generations of one benchmark: read what is there, then append.

    Args:
        path: The ``.jsonl`` file (created with its folder when missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0  # bytes of complete, valid lines
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            try:
                record = json.loads(raw)
                key = str(record["id"])
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                break
            self.records[key] = record
            good += len(raw)
        if good < len(data):
            # The tail a kill cut short (or anything after a damaged line): dropped, its questions asked again.
            log.warning("%s: dropping %d bytes after the last complete answer (an interrupted write)",
                        self.path, len(data) - good)
            with self.path.open("r+b") as f:
                f.truncate(good)

    def __contains__(self, question_id: str) -> bool:
        return question_id in self.records

    def rewrite(self) -> None:
        """Replace the file by the records held now (one line per id), atomically."""
        atomic_write_jsonl(self.path, self.records.values())

    def append(self, records: Iterable[dict]) -> None:
        """Write ``records`` at the end of the file and make them durable before returning."""
        records = list(records)
        if not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[str(r["id"])] = r
