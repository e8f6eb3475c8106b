"""The rule filters of CLIP-DPO (method.md section 5) and the pairing of best and worst responses.

Rules run in the order of ``RULES``; each removes images, candidates (sampled responses) or pairs (one
potential pair per example), and :class:`FilterLedger` counts what each removed:

1. ``text_heavy`` (images, optional): CLIP flags the image as text-heavy; it is skipped before sampling.
2. ``empty`` (candidates): a response without a sentence (``split_sentences``): nothing to score, and
   misp's record readers reject empty texts.
3. ``duplicate`` (candidates): a response equal to an earlier one of the same example after collapsing
   whitespace; the first is kept. Sampling at low temperature repeats itself, and duplicates would
   count as distinct candidates in the summary, cost CLIP passes for nothing, and with ``min_gap = 0``
   could pair a response with itself (a pair with zero DPO gradient).
4. ``max_tokens`` (candidates): longer than ``max_tokens`` VLM tokens.
5. ``min_score`` (candidates): CLIP score under ``min_score``.
6. ``too_few`` (pairs): fewer than two candidates survive, so there is no pair.
7. ``min_gap`` (pairs): the best and worst surviving scores differ by less than ``min_gap``.
8. ``max_len_ratio`` (pairs): the longer of best and worst has more than ``max_len_ratio`` times the
   tokens of the shorter.

The pair is always the best and the worst surviving response (highest and lowest score; ties go to
the earlier-sampled best and the later-sampled worst); an example whose extremes fail a pair rule is
dropped rather than paired otherwise, as method.md states the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from misp.prefs.config import FilterConfig
from misp.prefs.scoring import split_sentences

RULES: tuple[tuple[str, str], ...] = (
    ("text_heavy", "image"),
    ("empty", "candidate"),
    ("duplicate", "candidate"),
    ("max_tokens", "candidate"),
    ("min_score", "candidate"),
    ("too_few", "pair"),
    ("min_gap", "pair"),
    ("max_len_ratio", "pair"),
)
"""(rule, what it removes), in the order the rules are applied."""

CHOSEN = "chosen"
REJECTED = "rejected"
SURVIVED = "survived"
"""Fates of candidates that pass every candidate rule (paired as chosen, rejected, or neither)."""


@dataclass
class Candidate:
    """One sampled response and what the rules made of it."""

    text: str
    """The response."""
    index: int
    """Its position among the example's samples."""
    tokens: int = 0
    """Its length in VLM tokens (set by ``prepare_candidates``)."""
    score: float | None = None
    """Its aggregated CLIP score (None until scored)."""
    sentence_scores: tuple[float, ...] = ()
    """The CLIP score of each sentence."""
    fate: str | None = None
    """None while it survives; else the rule that removed it, or chosen / rejected / survived."""


@dataclass(frozen=True)
class Pair:
    """The chosen (best) and rejected (worst) response of an example."""

    chosen: Candidate
    rejected: Candidate

    @property
    def gap(self) -> float:
        return self.chosen.score - self.rejected.score


class FilterLedger:
    """Counts what each rule removed, for the summary; ``summary`` lists them in ``RULES`` order."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.images = 0
        """Input images seen."""
        self.generated = 0
        """Candidates sampled (for images that passed the image rules)."""
        self.removed: dict[str, int] = {name: 0 for name, _ in RULES}

    def remove(self, rule: str, count: int = 1) -> None:
        if rule not in self.removed:
            raise KeyError(f"unknown rule {rule!r}; rules: {[r for r, _ in RULES]}")
        self.removed[rule] += count

    def _settings(self) -> dict[str, tuple[bool, object]]:
        c = self.config
        return {
            "text_heavy": (c.text_heavy, c.text_heavy_threshold),
            "empty": (True, None),
            "duplicate": (True, None),
            "max_tokens": (c.max_tokens is not None, c.max_tokens),
            "min_score": (c.min_score is not None, c.min_score),
            "too_few": (True, 2),
            "min_gap": (True, c.min_gap),
            "max_len_ratio": (c.max_len_ratio is not None, c.max_len_ratio),
        }

    def summary(self) -> list[dict]:
        """One entry per rule in order: rule, level, enabled, threshold, removed, and left (what remains
        at that level after the rule: images, candidates, or examples that still have a pair)."""
        left = {
            "image": self.images,
            "candidate": self.generated,
            "pair": self.images - self.removed["text_heavy"],
        }
        settings = self._settings()
        out = []
        for name, level in RULES:
            left[level] -= self.removed[name]
            enabled, threshold = settings[name]
            out.append(
                {
                    "rule": name,
                    "level": level,
                    "enabled": enabled,
                    "threshold": threshold,
                    "removed": self.removed[name],
                    "left": left[level],
                }
            )
        return out


def _normalise(text: str) -> str:
    return " ".join(text.split())


def prepare_candidates(
    texts: Sequence[str], count_tokens: Callable[[str], int], config: FilterConfig, ledger: FilterLedger
) -> list[Candidate]:
    """Apply the score-free candidate rules (empty, duplicate, max_tokens) to one example's samples.

    Args:
        texts: the sampled responses, in sampling order.
        count_tokens: a response's length in VLM tokens.
        config: the thresholds.
        ledger: receives the counts.

    Returns:
        One ``Candidate`` per text; removed ones carry their rule in ``fate``, survivors ``fate=None``.
    """
    out = [Candidate(text=t, index=i) for i, t in enumerate(texts)]
    seen: set[str] = set()
    for c in out:
        if not split_sentences(c.text):
            c.fate = "empty"
            continue
        key = _normalise(c.text)
        if key in seen:
            c.fate = "duplicate"
            continue
        seen.add(key)
    for c in out:
        if c.fate is None:
            c.tokens = count_tokens(c.text)
            if config.max_tokens is not None and c.tokens > config.max_tokens:
                c.fate = "max_tokens"
    for rule in ("empty", "duplicate", "max_tokens"):
        ledger.remove(rule, sum(c.fate == rule for c in out))
    return out


def survivors(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no rule has removed yet."""
    return [c for c in candidates if c.fate is None]


def pair_candidates(
    candidates: Sequence[Candidate], config: FilterConfig, ledger: FilterLedger
) -> tuple[Pair | None, str]:
    """Apply ``min_score``, then form and check the best/worst pair of one example.

    Every surviving candidate must have been scored. Survivors end with fate chosen, rejected or
    survived (also when the pair is dropped).

    Returns:
        ``(pair, "kept")``, or ``(None, rule)`` naming the pair rule that dropped the example.
    """
    alive = survivors(candidates)
    if any(c.score is None for c in alive):
        raise ValueError("pair_candidates: every surviving candidate needs a score")
    if config.min_score is not None:
        for c in alive:
            if c.score < config.min_score:
                c.fate = "min_score"
        ledger.remove("min_score", sum(c.fate == "min_score" for c in alive))
        alive = survivors(alive)
    for c in alive:
        c.fate = SURVIVED
    if len(alive) < 2:
        ledger.remove("too_few")
        return None, "too_few"
    best = max(alive, key=lambda c: c.score)  # first of equal maxima
    worst = min(reversed(alive), key=lambda c: c.score)  # last of equal minima
    pair = Pair(best, worst)
    if pair.gap < config.min_gap:
        ledger.remove("min_gap")
        return None, "min_gap"
    if config.max_len_ratio is not None:
        short, long = sorted((best.tokens, worst.tokens))
        if long > config.max_len_ratio * max(short, 1):
            ledger.remove("max_len_ratio")
            return None, "max_len_ratio"
    best.fate, worst.fate = CHOSEN, REJECTED
    return pair, "kept"
