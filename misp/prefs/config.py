"""Configuration of CLIP-DPO preference generation (method.md section 5): ``misp prefs --config FILE``.

Every threshold of the rule filters is a field here, so a run's summary (which embeds this config) says
exactly which rules produced its pairs. Validation runs in ``__post_init__``, so a bad value fails when
the config is parsed, with a message that names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from misp.models.clip import ClipSpec
from misp.models.vlm import VLMSpec

Aggregate = Literal["mean", "min"]
TEXT_HEAVY_PROMPT = "an image with a lot of text"
PHOTO_PROMPT = "a photo"


@dataclass
class SamplingConfig:
    """How the VLM samples its candidate responses."""

    n: int = 8
    """Responses sampled per (image, prompt)."""
    temperature: float = 1.0
    """Softmax temperature of sampling."""
    top_p: float = 0.95
    """Nucleus mass of sampling."""
    max_new_tokens: int = 64
    """Longest response in VLM tokens; generation stops there even without an end-of-sequence token."""
    batch_size: int = 16
    """(image, prompt) inputs per generation call (each expands to ``n`` sequences)."""
    seed: int = 0
    """Seeds sampling: the same seed, batch size and inputs give the same responses."""

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"sampling.n must be at least 2 (a pair needs two responses), got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("sampling.max_new_tokens and sampling.batch_size must be positive")


@dataclass
class ScoringConfig:
    """How CLIP scores a response: ``100 * cos(h_v(image), h_t(sentence))`` per sentence, aggregated."""

    aggregate: Aggregate = "mean"
    """How sentence scores make the response score: ``mean`` (overall grounding) or ``min`` (a response
    is as good as its worst sentence, so one hallucinated sentence sinks it)."""
    batch_size: int = 256
    """Images or sentences per CLIP forward pass."""

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "min"):
            raise ValueError(f"scoring.aggregate must be 'mean' or 'min', got {self.aggregate!r}")
        if self.batch_size < 1:
            raise ValueError(f"scoring.batch_size must be positive, got {self.batch_size}")


@dataclass
class FilterConfig:
    """The rule filters of method.md section 5, applied in the order of the fields below."""

    text_heavy: bool = False
    """Drop images CLIP flags as text-heavy (zero-shot, see ``text_heavy_threshold``) before sampling:
    CLIP reads rendered text well, so on such images it rewards responses that copy the text rather than
    describe the scene."""
    text_heavy_threshold: float = 0.5
    """An image is text-heavy when its zero-shot probability of ``text_heavy_prompt`` against
    ``photo_prompt`` exceeds this."""
    text_heavy_prompt: str = TEXT_HEAVY_PROMPT
    """The zero-shot class of text-heavy images."""
    photo_prompt: str = PHOTO_PROMPT
    """The zero-shot class of ordinary images."""
    max_tokens: int | None = None
    """Drop responses longer than this many VLM tokens; None keeps all. Set it below
    ``sampling.max_new_tokens`` to also drop responses the generation limit cut off mid-sentence."""
    min_score: float | None = None
    """Drop responses whose CLIP score is under this; None keeps all. The scale depends on the CLIP
    (ViT-L-14/openai scores captions around 20-35), so there is no universal default."""
    min_gap: float = 2.0
    """Drop an example when the best and worst surviving responses' scores differ by less than this."""
    max_len_ratio: float | None = 2.0
    """Drop an example when the longer of chosen and rejected has more than this many times the VLM
    tokens of the shorter, so DPO does not learn a length preference; None disables the rule.
    **Decision:** the default 2.0 lets a one-object caption pair with a two-object one."""

    def __post_init__(self) -> None:
        if not 0 < self.text_heavy_threshold < 1:
            raise ValueError(
                f"filters.text_heavy_threshold must be in (0, 1), got {self.text_heavy_threshold}"
            )
        if not self.text_heavy_prompt.strip() or not self.photo_prompt.strip():
            raise ValueError("filters.text_heavy_prompt and filters.photo_prompt must be non-empty")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"filters.max_tokens must be positive or None, got {self.max_tokens}")
        if self.min_gap < 0:
            raise ValueError(f"filters.min_gap must be >= 0, got {self.min_gap}")
        if self.max_len_ratio is not None and self.max_len_ratio < 1:
            raise ValueError(f"filters.max_len_ratio must be >= 1 or None, got {self.max_len_ratio}")


@dataclass
class PrefsConfig:
    """CLIP-DPO preference generation: sample responses with the VLM, rank them with CLIP, filter, pair."""

    input_file: str
    """Records with ``id`` (optional), ``image`` and ``prompt``, JSON Lines or a JSON array: a prompt file
    (test.jsonl), a preference file (pref.jsonl, whose chosen/rejected are ignored), or any such file."""
    output_file: str
    """Where the preference records go (misp's JSON Lines format), written atomically."""
    vlm: VLMSpec
    """The VLM that samples the responses (the policy's starting point, e.g. the SFT export)."""
    clip: ClipSpec
    """The CLIP that scores them (any open_clip model)."""
    summary_file: str | None = None
    """Where the summary JSON goes; None: next to ``output_file`` as ``<stem>.summary.json``."""
    candidates_file: str | None = None
    """Optionally, every sampled response with its scores and fate (JSON Lines), for inspection."""
    image_root: str | None = None
    """Folder the input's relative image paths start from; default: the input file's folder."""
    prompt: str | None = None
    """Replace every record's prompt with this one (e.g. the captioning prompt); None keeps them."""
    objects_key: str | None = None
    """Key of each input record's ground-truth object list (``objects`` in test.jsonl, ``meta.objects``
    in pref.jsonl); copied into each pair's meta. None when the inputs have no ground truth."""
    objects: str | list[str] | None = None
    """Object vocabulary for pair precision: a list of names, or a Shapes world folder or world.json
    whose ``objects`` it reads. Needed with ``objects_key`` to measure precision."""
    absolute_paths: bool = False
    """Write absolute image paths; by default they are relative to the output file's folder."""
    limit: int | None = None
    """Use only the first N input records (None: all)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How the responses are sampled."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """How CLIP scores them."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """The rule filters and their thresholds."""
    cache_dir: str | None = None
    """Cache the CLIP image embeddings here (safetensors + sidecar); None: no cache."""
    device: str = "auto"
    """Where the VLM and CLIP run: ``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:1``..."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be positive or None, got {self.limit}")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must be non-empty or None")
        if (self.objects_key is None) != (self.objects is None):
            raise ValueError(
                "objects_key (each record's ground-truth objects) and objects (the vocabulary) go together: "
                "pair precision needs both; set both or neither"
            )
