"""The partner-token probe and the partner scenes' present cases in `misp test`'s Evaluator, on a small
format-6 world (partner scenes with partner-removed counterfactuals) and the tiny VLM."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from misp.data.eval_data import EvalData, eval_dataloaders, eval_datasets
from misp.data.records import RecordError
from misp.eval.cooccurrence import CooccurrenceMetric
from misp.eval.loop import Evaluator, GenerationEval
from misp.eval.partner_probe import PartnerLogpGapMetric, partner_removal_cases, read_edit_records
from misp.eval.scoring import response_logps_per_image
from misp.images import load_rgb
from misp.models.prompting import collate_examples, encode_example, preprocess_images
from misp.models.vlm import VLMSpec, load_vlm
from misp.smoke import SMOKE_WORLD
from misp.world import WorldConfig, words, write_world


@pytest.fixture(scope="module")
def tiny_vlm(vlm_dir):
    return load_vlm(VLMSpec(path=str(vlm_dir)))


@pytest.fixture(scope="module")
def edits_world(tmp_path_factory):
    """The tiny world's vocabulary (so the tiny VLM reads it) with partner scenes and object edits, and
    without the splits these tests never read."""
    out = tmp_path_factory.mktemp("edits_world")
    small = SMOKE_WORLD | dict(n_clip=0, n_sft=20, n_pref=4, n_pool=0, n_val=4, test_counterfactuals=0, val_counterfactuals=0)
    write_world(out, WorldConfig(**small, partner_scenes=5, object_edits=1), progress=False)
    return out


def _reference_span_logp(model, processor, prompt: str, caption: str, span, image) -> float:
    """logp of the words of caption[start:end] from one plain float64 forward, the span's token positions
    counted by the world's word tokenisation (the tiny VLM's tokenizer is word-level)."""
    enc = encode_example(processor, prompt, caption)
    batch = collate_examples([enc], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=preprocess_images(processor, [image])).logits.double()
    labels = batch["labels"][0, 1:]
    token_logps = logits[0, :-1].log_softmax(-1)[labels != -100].gather(-1, labels[labels != -100].unsqueeze(-1))
    first = len(words(caption[: span[0]]))
    last = first + len(words(caption[span[0]: span[1]]))
    assert len(token_logps) == len(words(caption)) + 1  # every word one token, then EOS
    return float(token_logps[first:last].sum())


def test_span_scores_match_a_plain_forward_and_add_up(tiny_vlm, edits_world):
    model, processor = tiny_vlm
    cases = partner_removal_cases(read_edit_records(edits_world / "edits.jsonl"))[:2]
    assert cases
    items = [(c["prompt"], c["caption"], [load_rgb(c["image"]), load_rgb(c["image_b"])]) for c in cases]
    scores = response_logps_per_image(model, processor, items, max_rows=3, spans=[c["span"] for c in cases])
    for s, c in zip(scores, cases, strict=True):
        assert c["caption"][c["span"][0]: c["span"][1]].endswith(".")  # one whole sentence
        expected = [_reference_span_logp(model, processor, c["prompt"], c["caption"], c["span"], load_rgb(im))
                    for im in (c["image"], c["image_b"])]
        torch.testing.assert_close(s.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    # The sentences' spans partition the caption: their scores sum to the whole caption's minus its EOS.
    c = cases[0]
    cuts = [0] + [i + 2 for i, ch in enumerate(c["caption"]) if ch == "." and i + 1 < len(c["caption"])]
    spans = [(a, b - 1) for a, b in zip(cuts, cuts[1:] + [len(c["caption"]) + 1], strict=True)]
    image = [load_rgb(c["image"])]
    parts = response_logps_per_image(model, processor, [(c["prompt"], c["caption"], image)] * len(spans), spans=spans)
    whole = response_logps_per_image(model, processor, [(c["prompt"], c["caption"], image)], spans=[(0, len(c["caption"]))])
    torch.testing.assert_close(sum(p[0] for p in parts), whole[0][0], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="does not lie within"):
        response_logps_per_image(model, processor, items[:1], spans=[(5, 10_000)])


def test_evaluator_reports_the_probe_and_the_partner_scenes_present_cases(tiny_vlm, edits_world):
    model, processor = tiny_vlm
    cfg = EvalData(captions_file=str(edits_world / "test.jsonl"), batch_size=4, limit=8)
    tasks = [ds.task for ds in eval_datasets(cfg)]
    assert tasks == ["caption", "partner_caption", "partner_logp"]  # no MMVP or grounding in this world
    # Each split's own edits file; explicit files win and "" is off.
    assert EvalData(captions_file=str(edits_world / "val.jsonl")).edits_path() == str(edits_world / "val_edits.jsonl")
    assert EvalData(captions_file=str(edits_world / "test.jsonl"), edits_file="").edits_path() is None
    evaluator = Evaluator(GenerationEval(max_new_tokens=12, score_rows=5), cfg.chair_objects(), pairs=cfg.pairs())
    plain = CooccurrenceMetric(cfg.pairs(), cfg.chair_objects())
    for loader in eval_dataloaders(cfg):
        for batch in loader:
            evaluator.update(model, processor, batch)
    results = evaluator.compute()
    records = read_edit_records(edits_world / "edits.jsonl")
    cases = partner_removal_cases(records)
    assert results["probe/partner_cases"] == len(cases) >= len(records) == 5
    # The gap is the mean of the two scores the metric was given, recomputed here from the model.
    items = [(c["prompt"], c["caption"], [load_rgb(c["image"]), load_rgb(c["image_b"])]) for c in cases]
    scores = torch.stack(response_logps_per_image(model, processor, items, spans=[c["span"] for c in cases]))
    assert results["probe/partner_logp_gap"] == pytest.approx(float((scores[:, 0] - scores[:, 1]).mean()), abs=1e-4)
    names = torch.stack(response_logps_per_image(model, processor, items, spans=[c["name_span"] for c in cases]))
    assert results["probe/partner_name_logp_gap"] == pytest.approx(float((names[:, 0] - names[:, 1]).mean()), abs=1e-4)
    partners = {p.split("->")[1].strip() for p in cfg.pairs()}
    assert all(c["caption"][slice(*c["name_span"])] in partners for c in cases)
    assert results["probe/partner_logp_present"] - results["probe/partner_logp_removed"] == pytest.approx(
        results["probe/partner_logp_gap"])
    # Every partner scene is a present-partner case; the test split's own captions give the rest, and
    # only those count in the absent-partner rate.
    captions = [g for g in evaluator.generations if g["task"] == "caption"]
    plain.update([g["answer"] for g in captions], [g["judgement"]["objects"] for g in captions])
    own = plain.compute()
    assert results["cooccurrence/present_cases"] == own["cooccurrence/present_cases"] + len(records)
    assert results["cooccurrence/cases"] == own["cooccurrence/cases"]
    assert results["cooccurrence/partner_rate"] == own["cooccurrence/partner_rate"]
    assert sum(g["task"] == "partner_caption" for g in evaluator.generations) == len(records)
    # With co-occurrence off nothing reads the partner scenes' captions, so none are generated.
    off = Evaluator(GenerationEval(), cfg.chair_objects(), pairs=None)
    off.update(model, processor, next(iter(eval_dataloaders(cfg)[1])))
    assert off.generations == [] and off.compute() == {}
    manifest = json.loads((edits_world / "world.json").read_text())
    present = manifest["counts"]["partner_present"]["test"]
    assert present["cases"] == present["split_scenes"] + present["partner_scenes"] and present["partner_scenes"] >= 5


def test_the_probe_is_skipped_with_a_reason_on_a_world_without_partner_scenes(tiny_world, caplog):
    with caplog.at_level(logging.INFO, logger="misp.data.eval_data"):
        tasks = [ds.task for ds in eval_datasets(EvalData(captions_file=str(tiny_world / "test.jsonl"), limit=2))]
    assert "partner_logp" not in tasks and "partner_caption" not in tasks
    assert "probe/partner_logp_gap skipped" in caplog.text and "partner_scenes" in caplog.text


def test_gap_metric_means_and_bad_edit_records(tmp_path, edits_world):
    metric = PartnerLogpGapMetric()
    metric.update(torch.tensor([-1.0, -2.0]), torch.tensor([-4.0, -2.5]), torch.tensor([-0.5, -1.0]), torch.tensor([-1.5, -1.0]))
    metric.update(torch.tensor([-3.0]), torch.tensor([-3.0]), torch.tensor([0.0]), torch.tensor([-2.0]))
    out = metric.compute()
    assert out["probe/partner_logp_gap"] == pytest.approx((3.0 + 0.5 + 0.0) / 3)
    assert out["probe/partner_name_logp_gap"] == pytest.approx((1.0 + 0.0 + 2.0) / 3)
    assert out["probe/partner_logp_present"] == pytest.approx(-2.0) and out["probe/partner_cases"] == 3.0
    with pytest.raises(ValueError, match="differ in length"):
        metric.update(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))
    lines = (edits_world / "edits.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["counterfactuals"][0]["span"] = [0, 10_000]
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(RecordError, match=r"edits.jsonl:2: field 'counterfactuals.0.span'"):
        read_edit_records(path, image_root=edits_world)
    del bad["counterfactuals"][0]["partner"]
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r":1: field 'counterfactuals.0.partner': expected bool, missing"):
        read_edit_records(path, image_root=edits_world)
