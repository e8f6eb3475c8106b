"""Shapes-MMVP and likelihood grounding through the Evaluator, with the tiny VLM on the tiny world."""

from __future__ import annotations

import pytest
import torch

from misp.data.eval_data import EvalData, eval_dataloaders
from misp.data.records import read_grounding_records
from misp.eval.loop import Evaluator, GenerationEval
from misp.eval.scoring import response_logps_per_image
from misp.images import load_rgb
from misp.models.prompting import collate_examples, encode_example, preprocess_images
from misp.models.vlm import VLMSpec, load_vlm


@pytest.fixture(scope="module")
def tiny_vlm(vlm_dir):
    return load_vlm(VLMSpec(path=str(vlm_dir)))


def _reference_logp(model, processor, prompt: str, response: str, image) -> float:
    """logp(response | prompt, image) from one plain forward, in float64, without misp's helpers."""
    enc = encode_example(processor, prompt, response)
    batch = collate_examples([enc], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            pixel_values=preprocess_images(processor, [image]),
        ).logits.double()
    labels = batch["labels"][0, 1:]
    logp = logits[0, :-1].log_softmax(-1)
    keep = labels != -100
    return float(logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum())


def test_caption_scores_match_a_plain_forward_in_any_batching(tiny_vlm, tiny_world):
    model, processor = tiny_vlm
    records = read_grounding_records(tiny_world / "grounding.jsonl").records[:3]
    items = [(r.prompt, r.caption, [load_rgb(r.image), *map(load_rgb, r.counterfactuals)]) for r in records]
    batched = response_logps_per_image(model, processor, items, max_rows=64)
    one_each = response_logps_per_image(model, processor, items, max_rows=1)
    for b, o, (prompt, caption, images) in zip(batched, one_each, items, strict=True):
        assert b.shape == (len(images),) and b.dtype == torch.float32
        assert len(set(b.tolist())) > 1  # the images matter to the score, so the comparison means something
        torch.testing.assert_close(b, o, rtol=1e-5, atol=1e-4)
        expected = torch.tensor([_reference_logp(model, processor, prompt, caption, im) for im in images], dtype=torch.float64)
        torch.testing.assert_close(b.double(), expected, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="no image"):
        response_logps_per_image(model, processor, [("p", "c", [])])


def test_evaluator_reports_mmvp_and_likelihood_grounding(tiny_vlm, tiny_world):
    model, processor = tiny_vlm
    cfg = EvalData(captions_file=str(tiny_world / "test.jsonl"), limit=6, batch_size=4)
    evaluator = Evaluator(GenerationEval(score_rows=7), cfg.chair_objects(), pairs=cfg.pairs())
    for loader in eval_dataloaders(cfg):
        for batch in loader:
            evaluator.update(model, processor, batch)
    results = evaluator.compute()
    assert results["mmvp/pairs"] == 6 and results["grounding/captions"] == 6
    assert 0.0 <= results["mmvp/pair_accuracy"] <= results["mmvp/question_accuracy"] <= 1.0
    assert any(k.startswith("grounding/likelihood_") for k in results)
    assert any(s["task"] == "mmvp" for s in evaluator.samples)
    # The pooled share is recomputed from the scores directly: the metric counts what the model says.
    records = read_grounding_records(tiny_world / "grounding.jsonl").records[:6]
    items = [(r.prompt, r.caption, [load_rgb(r.image), *map(load_rgb, r.counterfactuals)]) for r in records]
    scores = response_logps_per_image(model, processor, items)
    assert results["grounding/likelihood"] == pytest.approx(sum(bool((s[0] > s[1:]).all()) for s in scores) / 6)
    evaluator.reset()
    assert evaluator.compute() == {}
