"""The papers' results table: one row per model, the headline numbers of each benchmark as published.

Rates are shown in percent (as the MISP-DPO, mDPO and CHiP tables print them), MMHal's score on its
0-6 scale. A benchmark a model was not evaluated on is left blank.
"""

from __future__ import annotations

from collections.abc import Mapping

HEADLINE: tuple[tuple[str, str, bool], ...] = (
    ("MMHal score", "mmhal/score", False),
    ("MMHal hal.", "mmhal/hallucination_rate", True),
    ("HallB qAcc", "hallusionbench/qAcc", True),
    ("HallB fAcc", "hallusionbench/fAcc", True),
    ("HallB aAcc", "hallusionbench/aAcc", True),
    ("POPE acc", "pope/all/accuracy", True),
    ("POPE F1", "pope/all/f1", True),
    ("MMVP", "mmvp/pair_accuracy", True),
    ("AMBER CHAIR", "amber/generative/CHAIR", True),
    ("AMBER Cover", "amber/generative/Cover", True),
    ("AMBER Hal", "amber/generative/Hal", True),
    ("AMBER Cog", "amber/generative/Cog", True),
    ("AMBER acc", "amber/discriminative/accuracy", True),
    ("AMBER F1", "amber/discriminative/f1", True),
    ("ObjHal CHAIRs", "objhal/CHAIR_s", True),
    ("ObjHal CHAIRi", "objhal/CHAIR_i", True),
)
"""(column, results key, shown in percent)."""


def paper_table(runs: Mapping[str, Mapping[str, float]]) -> str:
    """An aligned table: a row per run (name -> results), a column per headline number any run has."""
    columns = [(c, k, pct) for c, k, pct in HEADLINE if any(k in r for r in runs.values())]
    if not columns:
        return ""
    header = ["model", *(c for c, _, _ in columns)]
    body = [
        [name, *(f"{r[k] * (100 if pct else 1):.1f}" if k in r else "" for _, k, pct in columns)]
        for name, r in runs.items()
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
        for row in [header, *body]
    )
