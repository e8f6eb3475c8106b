"""CLIP-DPO preference data (method.md section 5): the VLM's own samples, ranked by CLIP and rule-filtered.

``misp prefs --config configs/shapes/clip_dpo_prefs.yaml`` runs :func:`run_prefs`; the records it writes
train plain DPO (``configs/methods/clip_dpo.yaml`` with ``configs/shapes/clip_dpo_data.yaml``).
"""

from misp.prefs.config import FilterConfig, PrefsConfig, SamplingConfig, ScoringConfig
from misp.prefs.filters import RULES, Candidate, FilterLedger, Pair, pair_candidates, prepare_candidates
from misp.prefs.generate import format_summary, run_prefs
from misp.prefs.inputs import PromptInput, read_inputs
from misp.prefs.precision import PrecisionReport, file_precision, load_vocabulary, pair_precision
from misp.prefs.scoring import (
    ResponseScore,
    aggregate,
    score_responses,
    split_sentences,
    text_heavy_probability,
)

__all__ = [
    "RULES",
    "Candidate",
    "FilterConfig",
    "FilterLedger",
    "Pair",
    "PrecisionReport",
    "PrefsConfig",
    "PromptInput",
    "ResponseScore",
    "SamplingConfig",
    "ScoringConfig",
    "aggregate",
    "file_precision",
    "format_summary",
    "load_vocabulary",
    "pair_candidates",
    "pair_precision",
    "prepare_candidates",
    "read_inputs",
    "run_prefs",
    "score_responses",
    "split_sentences",
    "text_heavy_probability",
]
