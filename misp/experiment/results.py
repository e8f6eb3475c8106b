"""The experiment's raw results: one JSON object per evaluated run in ``results.jsonl``, and their summary
over seeds."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

from misp.utils.io import atomic_write_text


class ResultsLog:
    """``results.jsonl``: rows keyed by (run id, split). Rewritten whole and atomically on every change, so
    a run killed mid-write leaves the previous file, never half a line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():
            for n, line in enumerate(self.path.read_text(encoding="utf-8").split("\n"), 1):  # JSON Lines: \n only
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{self.path}:{n}: not a JSON object ({e.msg}); fix or delete the line") from None

    def find(self, run_id: str, split: str, fingerprint: str | None = None) -> dict | None:
        """The row of ``run_id`` on ``split`` (made with ``fingerprint``, when given), or None."""
        for row in self.rows:
            if row["run"] == run_id and row["split"] == split and fingerprint in (None, row.get("fingerprint")):
                return row
        return None

    def put(self, row: dict) -> None:
        """Add ``row``, replacing any earlier row of the same run and split."""
        self.rows = [r for r in self.rows if not (r["run"] == row["run"] and r["split"] == row["split"])]
        self.rows.append(row)
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count; NaN values are left out."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def summarise(rows: list[dict], metrics: list[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """Per variant, per metric: (mean, std, n) over its test rows (one per seed)."""
    by_variant: dict[str, list[dict]] = {}
    for row in rows:
        if row["split"] == "test":
            by_variant.setdefault(row["variant"], []).append(row)
    return {
        variant: {m: mean_std(r["metrics"].get(m, math.nan) for r in runs) for m in metrics}
        for variant, runs in by_variant.items()
    }


def training_curve_summary(log_dir: Path, keys_prefixes: tuple[str, ...] = ("img/", "is/", "loss/", "rewards/", "diag/", "train/")) -> dict:
    """First and last logged value of each training metric under ``keys_prefixes``, from the run's CSV logs
    (every ``metrics.csv`` under ``log_dir``, in version order: a resumed fit continues in a new version).

    Returns ``{key: {"first": x, "last": y, "mean": m}}``; ``mean`` is over every logged step.
    """
    series: dict[str, list[float]] = {}
    for path in sorted(Path(log_dir).glob("*/metrics.csv"), key=lambda p: p.parent.name):
        with open(path, newline="", encoding="utf-8") as f:
            for record in csv.DictReader(f):
                for key, value in record.items():
                    if key and value not in (None, "") and key.startswith(keys_prefixes):
                        try:
                            series.setdefault(key, []).append(float(value))
                        except ValueError:
                            continue
    return {k: {"first": v[0], "last": v[-1], "mean": statistics.fmean(v)} for k, v in sorted(series.items()) if v}
