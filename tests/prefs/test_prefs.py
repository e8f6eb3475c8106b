"""CLIP-DPO preference generation (misp.prefs, `misp prefs`): rules, pairing, scoring, precision, files."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from misp.cli import _prefs_parser, main
from misp.data.records import RecordError, read_preference_records
from misp.demo import method_configs
from misp.models.clip import ClipSpec, load_clip
from misp.models.vlm import VLMSpec
from misp.negatives.embed import embed_images
from misp.prefs import (
    RULES,
    FilterConfig,
    FilterLedger,
    PrefsConfig,
    SamplingConfig,
    aggregate,
    file_precision,
    load_vocabulary,
    pair_candidates,
    pair_precision,
    prepare_candidates,
    read_inputs,
    run_prefs,
    score_responses,
    split_sentences,
    text_heavy_probability,
)
from misp.prefs.filters import Candidate

ROOT = Path(__file__).resolve().parents[2]


def words(text: str) -> int:
    return len(text.split())


def scored(*items: tuple[str, float, int]) -> list[Candidate]:
    """Surviving candidates with given (text, score, tokens)."""
    return [Candidate(text=t, index=i, tokens=n, score=s) for i, (t, s, n) in enumerate(items)]


def fates(candidates: list[Candidate]) -> list[str | None]:
    return [c.fate for c in candidates]


# ------------------------------------------------------------------------------------- candidate rules
def test_empty_rule_removes_responses_without_a_sentence():
    ledger = FilterLedger(FilterConfig())
    cands = prepare_candidates(["", "   ", ". ?", "1.", "a red circle."], words, FilterConfig(), ledger)
    assert fates(cands) == ["empty", "empty", "empty", "empty", None]
    assert ledger.removed["empty"] == 4 and sum(ledger.removed.values()) == 4


def test_duplicate_rule_keeps_the_first_of_whitespace_equal_responses():
    texts = ["a red circle.", "a  red circle. ", "A red circle.", "a blue square.", "a red circle."]
    ledger = FilterLedger(FilterConfig())
    cands = prepare_candidates(texts, words, FilterConfig(), ledger)
    # Case is kept distinct: only whitespace is normalised.
    assert fates(cands) == [None, "duplicate", None, None, "duplicate"]
    assert ledger.removed["duplicate"] == 2


def test_max_tokens_rule_removes_only_longer_responses():
    config = FilterConfig(max_tokens=3)
    ledger = FilterLedger(config)
    cands = prepare_candidates(
        ["one two", "one two three", "one two three four", "a b c d e"], words, config, ledger
    )
    assert fates(cands) == [None, None, "max_tokens", "max_tokens"]
    assert [c.tokens for c in cands] == [2, 3, 4, 5]
    assert ledger.removed["max_tokens"] == 2
    # None disables the rule.
    off = prepare_candidates(
        ["a b c d e"], words, FilterConfig(max_tokens=None), FilterLedger(FilterConfig())
    )
    assert fates(off) == [None]


def test_min_score_rule_removes_only_lower_scores():
    config = FilterConfig(min_score=20.0, min_gap=0.0, max_len_ratio=None)
    ledger = FilterLedger(config)
    cands = scored(("a.", 19.99, 1), ("b.", 20.0, 1), ("c.", 35.0, 1), ("d.", -5.0, 1))
    pair, outcome = pair_candidates(cands, config, ledger)
    assert outcome == "kept"
    assert fates(cands) == ["min_score", "rejected", "chosen", "min_score"]
    assert ledger.removed["min_score"] == 2


def test_text_heavy_probability_is_clip_zero_shot(tmp_path):
    """Against a brute-force softmax with the model's logit scale, on a stand-in CLIP whose prompt
    embeddings are known."""
    text_vec, photo_vec = (
        F.normalize(torch.tensor([1.0, 0.0, 0.0]), dim=0),
        F.normalize(torch.tensor([0.0, 1.0, 0.0]), dim=0),
    )
    bundle = TableCLIP.bundle(
        {"an image with a lot of text": text_vec, "a photo": photo_vec}, logit_scale=math.log(10.0)
    )
    images = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.5, 0.5, 0.7]]), dim=-1)
    p = text_heavy_probability(bundle, images, "an image with a lot of text", "a photo")
    logits = 10.0 * torch.stack([images @ text_vec, images @ photo_vec], dim=1)
    torch.testing.assert_close(p, logits.softmax(dim=1)[:, 0])
    assert p[0] > 0.5 > p[1]


# ------------------------------------------------------------------------------------- pair rules
def test_pairing_picks_best_and_worst():
    config = FilterConfig(min_gap=2.0, max_len_ratio=None)
    cands = scored(("a.", 5.0, 2), ("b.", 9.0, 2), ("c.", 1.0, 2), ("d.", 7.0, 2))
    pair, outcome = pair_candidates(cands, config, FilterLedger(config))
    assert outcome == "kept"
    assert (pair.chosen.text, pair.rejected.text, pair.gap) == ("b.", "c.", 8.0)
    assert fates(cands) == ["survived", "chosen", "rejected", "survived"]


def test_pairing_breaks_ties_by_sampling_order():
    config = FilterConfig(min_gap=0.0, max_len_ratio=None)
    cands = scored(("a.", 3.0, 2), ("b.", 3.0, 2), ("c.", 3.0, 2))
    pair, _ = pair_candidates(cands, config, FilterLedger(config))
    # Equal scores: the first is chosen and the last rejected, never a response against itself.
    assert (pair.chosen.index, pair.rejected.index) == (0, 2)


def test_too_few_rule_needs_two_survivors():
    config = FilterConfig(min_score=10.0)
    ledger = FilterLedger(config)
    pair, outcome = pair_candidates(scored(("a.", 30.0, 2), ("b.", 5.0, 2)), config, ledger)
    assert (pair, outcome) == (None, "too_few")
    assert ledger.removed["too_few"] == 1 and ledger.removed["min_score"] == 1


def test_min_gap_rule_is_inclusive():
    config = FilterConfig(min_gap=2.0, max_len_ratio=None)
    ledger = FilterLedger(config)
    assert pair_candidates(scored(("a.", 11.9, 2), ("b.", 10.0, 2)), config, ledger) == (None, "min_gap")
    pair, outcome = pair_candidates(scored(("a.", 12.0, 2), ("b.", 10.0, 2)), config, ledger)
    assert outcome == "kept" and pair.gap == pytest.approx(2.0)
    assert ledger.removed["min_gap"] == 1


def test_max_len_ratio_rule_compares_chosen_and_rejected_lengths():
    config = FilterConfig(min_gap=0.0, max_len_ratio=2.0)
    ledger = FilterLedger(config)
    # The best (3 tokens) and worst (7 tokens) differ by more than 2x; a short middle one does not matter.
    assert pair_candidates(scored(("a.", 9.0, 3), ("b.", 5.0, 1), ("c.", 1.0, 7)), config, ledger) == (
        None,
        "max_len_ratio",
    )
    pair, outcome = pair_candidates(scored(("a.", 9.0, 3), ("c.", 1.0, 6)), config, ledger)
    assert outcome == "kept"
    assert ledger.removed["max_len_ratio"] == 1
    off = FilterConfig(min_gap=0.0, max_len_ratio=None)
    assert pair_candidates(scored(("a.", 9.0, 1), ("c.", 1.0, 60)), off, FilterLedger(off))[1] == "kept"


def test_summary_counts_follow_the_rule_order():
    config = FilterConfig(max_tokens=4, min_score=0.0, min_gap=2.0, max_len_ratio=2.0)
    ledger = FilterLedger(config)
    ledger.images, ledger.generated = 5, 16  # 5 images, one text-heavy; 4 samples for each other image
    ledger.remove("text_heavy")
    score = {
        "a.": 10.0,
        "b b.": 1.0,
        "c c c.": 9.5,
        "d.": -1.0,
        "e e e e e.": 5.0,
        "f.": 8.0,
        "g g g g.": 0.5,
    }
    examples = [
        ["a.", "b b.", "", "a."],  # empty 1, duplicate 1 -> pair (a., b b.) gap 9, ratio 2: kept
        ["c c c.", "d.", "e e e e e.", "c c c."],  # duplicate 1, max_tokens 1, min_score 1 -> too_few
        ["a.", "c c c.", "", ""],  # empty 2 -> gap 0.5 < 2: min_gap
        ["f.", "g g g g.", "a.", "f."],  # duplicate 1 -> (a., g g g g.) ratio 4 > 2: max_len_ratio
    ]
    for texts in examples:
        cands = prepare_candidates(texts, words, config, ledger)
        for c in cands:
            if c.fate is None:
                c.score = score[c.text]
        pair_candidates(cands, config, ledger)
    summary = ledger.summary()
    assert [r["rule"] for r in summary] == [name for name, _ in RULES]
    assert {r["rule"]: (r["removed"], r["left"]) for r in summary} == {
        "text_heavy": (1, 4),
        "empty": (3, 13),
        "duplicate": (3, 10),
        "max_tokens": (1, 9),
        "min_score": (1, 8),
        "too_few": (1, 3),
        "min_gap": (1, 2),
        "max_len_ratio": (1, 1),
    }
    assert [r["level"] for r in summary] == ["image"] + ["candidate"] * 4 + ["pair"] * 3
    assert summary[0]["enabled"] is False and summary[3]["threshold"] == 4


# ------------------------------------------------------------------------------------- scoring
@dataclass
class Bundle:
    model: Any
    preprocess: Any
    tokenizer: Any
    identity: str


class TableCLIP(torch.nn.Module):
    """A stand-in CLIP whose text embedding of each known string is given: texts tokenise to row ids."""

    def __init__(self, table: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.logit_scale = torch.nn.Parameter(torch.tensor(logit_scale))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]

    @classmethod
    def bundle(cls, texts: dict[str, torch.Tensor], logit_scale: float = math.log(100.0)) -> Bundle:
        names = list(texts)
        model = cls(torch.stack([texts[n] for n in names]), logit_scale)
        return Bundle(model, None, lambda batch: torch.tensor([[names.index(t)] for t in batch]), "table")


def test_split_sentences():
    assert split_sentences("a red circle at the top. a blue square .\nA star!") == [
        "a red circle at the top.", "a blue square .", "A star!"
    ]  # fmt: skip
    assert split_sentences("3.5 apples? yes") == ["3.5 apples?", "yes"]
    assert split_sentences(" . . ") == []


def test_aggregate_mean_and_min():
    assert aggregate([10.0, 20.0, 60.0], "mean") == pytest.approx(30.0)
    assert aggregate([10.0, 20.0, 60.0], "min") == 10.0
    with pytest.raises(ValueError, match="mean"):
        aggregate([1.0], "max")
    with pytest.raises(ValueError):
        aggregate([], "mean")


@pytest.mark.parametrize("how", ["mean", "min"])
def test_score_responses_scores_each_sentence_then_aggregates(how):
    image = F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    vectors = {"a red circle.": torch.tensor([1.0, 1.0, 0.0]), "a blue square.": torch.tensor([1.0, 0.0, 0.0]),
               "a star.": torch.tensor([0.0, 0.0, 1.0])}  # fmt: skip
    bundle = TableCLIP.bundle(vectors)
    cos = {t: 100.0 * float(F.normalize(v, dim=0) @ image) for t, v in vectors.items()}  # 100, 70.71, 0
    responses = [["a red circle. a blue square.", "a star. a red circle. a blue square.", "a star."]]
    [scores] = score_responses(bundle, image[None], responses, how=how)
    expected = [
        [cos["a red circle."], cos["a blue square."]],
        [cos["a star."], cos["a red circle."], cos["a blue square."]],
        [0.0],
    ]
    for s, per in zip(scores, expected, strict=True):
        assert s.sentences == pytest.approx(per, abs=1e-4)
        want = sum(per) / len(per) if how == "mean" else min(per)
        assert s.score == pytest.approx(want, abs=1e-4)
    with pytest.raises(ValueError, match="empty"):
        score_responses(bundle, image[None], [[" . "]])


# ------------------------------------------------------------------------------------- precision
def test_pair_precision_counts_hallucinated_mentions():
    vocab = ["red circle", "blue square", "green triangle"]
    truth = ["red circle"]
    report = pair_precision(
        [
            ("a red circle.", "a red circle. a blue square.", truth),  # correct: 0 < 1
            ("a red circle.", "a small red circle.", truth),  # tie: 0 = 0
            ("a green triangle. a blue square.", "a blue square.", truth),  # inverted: 2 > 1
            ("a red circle.", "a blue square. a blue square.", truth),  # correct: repeats count, 0 < 2
        ],
        vocab,
    )
    assert (report.pairs, report.correct, report.ties, report.inverted) == (4, 2, 1, 1)
    assert report.precision == 0.5
    assert report.chosen_hallucinations == 0.5 and report.rejected_hallucinations == 1.0
    assert pair_precision([], vocab).precision is None


def test_world_pref_file_pairs_are_all_precise(tiny_world):
    """The world's own pairs add one hallucination to the true caption, so their precision is exactly 1."""
    report = file_precision(tiny_world / "pref.jsonl", load_vocabulary(tiny_world))
    assert report.pairs == 48 and report.precision == 1.0


# ------------------------------------------------------------------------------------- end to end
def tiny_config(tiny_world, clip_dir, vlm_dir, out: Path, **overrides) -> PrefsConfig:
    settings = dict(
        input_file=str(tiny_world / "pref.jsonl"),
        output_file=str(out / "prefs.jsonl"),
        vlm=VLMSpec(path=str(vlm_dir)),
        clip=ClipSpec(checkpoint=str(clip_dir)),
        candidates_file=str(out / "candidates.jsonl"),
        objects_key="meta.objects",
        objects=str(tiny_world),
        limit=6,
        sampling=SamplingConfig(n=4, max_new_tokens=10, batch_size=4, seed=0),
        filters=FilterConfig(min_gap=2.0, max_len_ratio=None),
        device="cpu",
        progress=False,
    )
    settings.update(overrides)
    return PrefsConfig(**settings)


def test_run_prefs_writes_valid_records_and_a_matching_summary(tiny_world, clip_dir, vlm_dir, tmp_path):
    summary = run_prefs(tiny_config(tiny_world, clip_dir, vlm_dir, tmp_path / "out"))
    records = read_preference_records(tmp_path / "out" / "prefs.jsonl").records  # the format validator
    assert summary["pairs"] == len(records) > 0
    assert summary["inputs"] == 6 and summary["candidates"] == 24
    assert summary["rules"][-1]["left"] == len(records)
    rows = [json.loads(line) for line in (tmp_path / "out" / "candidates.jsonl").read_text().splitlines()]
    world = {r["id"]: r for r in map(json.loads, (tiny_world / "pref.jsonl").read_text().splitlines())}
    for rec, row in zip(records, (r for r in rows if r["pair"] == "kept"), strict=True):
        assert rec.image == (tiny_world / world[rec.id]["image"]).absolute()
        chosen = [c for c in row["candidates"] if c["fate"] == "chosen"]
        rejected = [c for c in row["candidates"] if c["fate"] == "rejected"]
        scores = [c["score"] for c in row["candidates"] if c["score"] is not None]
        assert chosen[0]["text"] == rec.chosen and chosen[0]["score"] == max(scores)
        assert rejected[0]["text"] == rec.rejected and rejected[0]["score"] == min(scores)
        assert rec.meta["scores"] == {"chosen": chosen[0]["score"], "rejected": rejected[0]["score"]}
        assert rec.meta["gap"] >= 2.0 - 1e-3
        assert rec.meta["objects"] == world[rec.id]["meta"]["objects"]
        assert rec.meta["candidates"] == 4
        assert rec.meta["survivors"] == sum(c["fate"] in ("chosen", "rejected", "survived") for c in row["candidates"])
    # The summary's precision is the precision of the written file.
    assert (
        summary["precision"]
        == file_precision(tmp_path / "out" / "prefs.jsonl", load_vocabulary(tiny_world)).to_dict()
    )


def test_generation_is_reproducible_for_a_fixed_seed(tiny_world, clip_dir, vlm_dir, tmp_path):
    out = tmp_path / "out"
    config = tiny_config(tiny_world, clip_dir, vlm_dir, out, limit=4)
    run_prefs(config)
    first = (out / "prefs.jsonl").read_bytes(), (out / "candidates.jsonl").read_bytes()
    run_prefs(config)
    assert ((out / "prefs.jsonl").read_bytes(), (out / "candidates.jsonl").read_bytes()) == first
    run_prefs(
        tiny_config(
            tiny_world,
            clip_dir,
            vlm_dir,
            out,
            limit=4,
            sampling=SamplingConfig(n=4, max_new_tokens=10, batch_size=4, seed=1),
        )
    )
    assert (out / "candidates.jsonl").read_bytes() != first[1]


def test_text_heavy_rule_skips_exactly_the_flagged_images(tiny_world, clip_dir, vlm_dir, tmp_path):
    inputs = read_inputs(tiny_world / "pref.jsonl", limit=6)
    clip = load_clip(ClipSpec(checkpoint=str(clip_dir)))
    p = text_heavy_probability(
        clip,
        embed_images(clip, [i.image for i in inputs], progress=False),
        "an image with a lot of text",
        "a photo",
    )
    threshold = float(p.median())
    flagged = {i.id for i, q in zip(inputs, p.tolist(), strict=True) if q > threshold}
    assert 0 < len(flagged) < len(inputs)
    config = tiny_config(
        tiny_world,
        clip_dir,
        vlm_dir,
        tmp_path,
        filters=FilterConfig(text_heavy=True, text_heavy_threshold=threshold),
    )
    summary = run_prefs(config)
    rows = [json.loads(line) for line in (tmp_path / "candidates.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == {i.id for i in inputs} - flagged
    assert summary["rules"][0] == {"rule": "text_heavy", "level": "image", "enabled": True, "threshold": threshold,
                                   "removed": len(flagged), "left": len(inputs) - len(flagged)}  # fmt: skip
    assert summary["candidates"] == 4 * (len(inputs) - len(flagged))


def test_inputs_need_image_and_prompt(tiny_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": str(tiny_world / "images/pref/pref-000000.png")}) + "\n")
    with pytest.raises(RecordError, match="prompt"):
        read_inputs(bad)
    # Prompt files (test.jsonl) carry ground truth at the top level.
    [first] = read_inputs(tiny_world / "test.jsonl", objects_key="objects", prompt="what is here?", limit=1)
    assert first.prompt == "what is here?" and first.objects


def test_config_validation():
    with pytest.raises(ValueError, match="go together"):
        PrefsConfig(
            input_file="a",
            output_file="b",
            vlm=VLMSpec(path="v"),
            clip=ClipSpec(checkpoint="c"),
            objects_key="objects",
        )
    with pytest.raises(ValueError, match="max_len_ratio"):
        FilterConfig(max_len_ratio=0.5)
    with pytest.raises(ValueError, match="at least 2"):
        SamplingConfig(n=1)


def test_misp_prefs_subcommand_runs_end_to_end(tiny_world, clip_dir, vlm_dir, tmp_path, capsys):
    config = {
        "input_file": str(tiny_world / "pref.jsonl"),
        "output_file": str(tmp_path / "run" / "prefs.jsonl"),
        "vlm": {"path": str(vlm_dir)},
        "clip": {"checkpoint": str(clip_dir)},
        "objects_key": "meta.objects",
        "objects": str(tiny_world),
        "limit": 4,
        "sampling": {"n": 3, "max_new_tokens": 8, "batch_size": 4},
        "filters": {"min_gap": 1.0},
        "device": "cpu",
        "progress": False,
    }
    path = tmp_path / "prefs.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["prefs", "--config", str(path), "--sampling.seed", "3"])
    out = capsys.readouterr().out
    assert "max_len_ratio" in out and "pair precision" in out
    summary = json.loads((tmp_path / "run" / "prefs.summary.json").read_text())
    assert summary["config"]["sampling"]["seed"] == 3 and summary["inputs"] == 4
    assert f"wrote {summary['pairs']} preference records" in out
    assert summary["pairs"] > 0
    assert len(read_preference_records(tmp_path / "run" / "prefs.jsonl")) == summary["pairs"]


def test_shipped_prefs_config_parses():
    parser = _prefs_parser()
    cfg = parser.parse_args(["--config", str(ROOT / "configs/shapes/clip_dpo_prefs.yaml")])
    assert cfg.vlm.path == "runs/shapes/sft/export" and cfg.clip.checkpoint == "runs/shapes/clip/export"
    assert cfg.output_file == "runs/shapes/clip_dpo/prefs.jsonl" and cfg.filters.min_gap == 2.0
    assert cfg.scoring.aggregate == "mean"


def test_clip_dpo_training_config_loads(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *method_configs("clip_dpo"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    data, model = printed["data"]["init_args"], printed["model"]["init_args"]
    method = model["method"]
    assert data["records_file"] == "runs/shapes/clip_dpo/prefs.jsonl" and method["negatives"]["source"] == "none"
    terms = [t["class_path"] for t in method["terms"].values()]
    assert terms == ["misp.dpo.terms.TextDPO"] and method["beta"] == 0.1  # plain DPO
    assert model["vlm"]["path"] == "runs/shapes/sft/export"
