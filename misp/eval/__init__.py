"""Evaluation: POPE, CHAIR, co-occurrence hallucination, Shapes-MMVP and likelihood grounding as
torchmetrics metrics, and the answer parsing they rely on; the published benchmarks of ``misp eval``
(``misp.eval.run.BENCHMARKS``: POPE, HallusionBench, MMVP, AMBER, Object HalBench, MMHal-Bench)."""

from misp.eval.answers import read_option, read_yes_no
from misp.eval.cooccurrence import CooccurrenceMetric
from misp.eval.grounding import LikelihoodGroundingMetric, MMVPMetric
from misp.eval.metrics import CHAIRMetric, POPEMetric, format_results
from misp.eval.parsing import MentionExtractor, extract_mentions, parse_yes_no

__all__ = [
    "CHAIRMetric",
    "CooccurrenceMetric",
    "LikelihoodGroundingMetric",
    "MMVPMetric",
    "MentionExtractor",
    "POPEMetric",
    "extract_mentions",
    "format_results",
    "parse_yes_no",
    "read_option",
    "read_yes_no",
]
