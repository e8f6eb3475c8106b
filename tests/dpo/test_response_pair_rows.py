"""The model side of response pairs: the pair rows in the one forward, their cells equal to each row run alone,
their reference log-probs cached under keys that include the response, per-token log-probs for spans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from misp.batch import ImageInputs, NegativeRef, PreferenceBatch, ResponsePairRows, TokenRows
from misp.data.negative_sampler import NegativeSamplerDataModule
from misp.dpo import MISPDPOModule
from misp.dpo.batching import concatenate_rows, row_keys, split_pair_rows, split_rows
from misp.dpo.method import Method, MethodError
from misp.dpo.terms import ResponsePairs
from misp.logprobs import response_token_logps, sequence_logps
from misp.models.vlm import VLMSpec


def _batch(b: int = 2, k: int = 2, pairs: bool = True) -> PreferenceBatch:
    rows = TokenRows(torch.ones(b, 5, dtype=torch.long), torch.ones(b, 5, dtype=torch.long), torch.ones(b, 5, dtype=torch.long))
    own = TokenRows(torch.full((b * k, 7), 2), torch.ones(b * k, 7, dtype=torch.long), torch.full((b * k, 7), 2))
    images = ImageInputs({"pixel_values": torch.randn(b + b * k, 3, 4, 4)}, torch.full((b + b * k,), 4))
    refs = [[NegativeRef("edits", f"e{r}.png", j, response=f"caption {j}") for j in range(k)] for r in range(b)]
    return PreferenceBatch([f"r{i}" for i in range(b)], rows, rows, images, refs, torch.zeros(b, k),
                           torch.zeros(b, k, dtype=torch.long), ResponsePairRows(own) if pairs else None)


def test_the_pair_rows_follow_the_three_blocks_and_read_the_right_images():
    with_pairs, without = concatenate_rows(_batch(), 0), concatenate_rows(_batch(pairs=False), 0)
    b, k = 2, 2
    assert with_pairs.pairs and not without.pairs
    assert with_pairs.input_ids.shape == (2 * b + 3 * b * k, 7) and without.input_ids.shape == (2 * b + b * k, 5)
    # (m_k, y_k) reads negative image B + r*K + k; (m_p, y_k) reads record r's positive
    assert with_pairs.image_index.tolist() == [0, 1, 0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 0, 0, 1, 1]
    assert torch.equal(with_pairs.input_ids[: 2 * b + b * k, :5], without.input_ids)
    values = torch.arange(2 * b + 3 * b * k, dtype=torch.float)
    chosen, rejected, negatives = split_rows(values, b, k)
    own, swapped = split_pair_rows(values, b, k)
    assert negatives.tolist() == [[4, 5], [6, 7]] and own.tolist() == [[8, 9], [10, 11]]
    assert swapped.tolist() == [[12, 13], [14, 15]]


def test_pair_keys_name_the_response_so_two_captions_of_one_image_are_two_rows():
    batch = _batch()
    keys = row_keys(batch)
    assert len(keys) == len(set(keys)) == 2 * 2 + 3 * 4
    ref = batch.negatives[1][0]
    assert keys[4 + 4 + 2] == ("r1", "response:caption 0", ref) and keys[4 + 8 + 2] == ("r1", "response:caption 0", "positive")
    other = ref._replace(response="another caption")
    assert other != ref and hash(other) != hash(ref)
    assert NegativeRef(*list(ref)) == ref  # the reference cache's checkpoint form round-trips


def test_response_token_logps_are_each_tokens_log_prob_in_order():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100], [-100] * 6])
    tokens = response_token_logps(logits, labels)
    logp = logits.log_softmax(-1)
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for n in range(3):
        scored = [(t, int(labels[n, t + 1])) for t in range(5) if labels[n, t + 1] != -100]
        for j, (t, y) in enumerate(scored):
            expected[n, j] = logp[n, t, y]
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(tokens.sum(-1), sequence_logps(logits, labels))


def test_the_in_context_branch_is_refused_by_a_source_that_builds_no_two_image_rows_in_one_line():
    Method(beta=0.1, terms={"pairs_ic": ResponsePairs(context="in_context")}, negatives={"source": "edits", "k": 1})
    with pytest.raises(MethodError) as e:
        Method(beta=0.1, terms={"pairs_ic": ResponsePairs(context="in_context")}, negatives={"source": "sae_pairs", "k": 1})
    lines = [x for x in str(e.value).splitlines() if x.strip().startswith("-")]
    assert len(lines) == 1 and "two-image context" in lines[0] and "'sae_pairs'" in lines[0]


@pytest.fixture
def edits_records(tiny_world, tmp_path) -> Path:
    """The tiny world's first records, each with two edits: its counterfactual renders, its rejected caption as
    one's response and a made-up one as the other's (only the numbers matter here)."""
    rows = [json.loads(line) for line in (tiny_world / "pref.jsonl").read_text().splitlines()[:4]]
    for r in rows:
        r["image"] = str(tiny_world / r["image"])
        r["edits"] = [{"image": str(tiny_world / r["meta"]["counterfactuals"][0]), "response": r["rejected"]},
                      {"image": str(tiny_world / r["meta"]["counterfactuals"][1]), "response": "a small red circle."}]
    f = tmp_path / "edits.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def test_each_pair_cell_is_the_rows_own_log_prob_and_its_reference_is_cached(edits_records, vlm_dir, tmp_path):
    from misp.data.pixel_cache import image_inputs
    from misp.models.forward import response_logits
    from misp.models.prompting import collate_examples, encode_example

    torch.manual_seed(0)
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("symmpo"))
    dm = NegativeSamplerDataModule(records_file=str(edits_records), batch_size=2, cache_dir=str(tmp_path / "cache"),
                                   progress=False, preview_records=0)
    dm.attach(module)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.pairs is not None and batch.k == 1 and batch.negatives[0][0].response
    rows = concatenate_rows(batch, module.processor.tokenizer.pad_token_id, 1)
    with torch.no_grad():
        values = module._logps(module.model, rows, batch.images)
    own, swapped = split_pair_rows(values, batch.batch_size, 1)
    records = {r.id: r for r in dm.records}
    for r, rid in enumerate(batch.ids):
        ref = batch.negatives[r][0]
        row = collate_examples([encode_example(module.processor, records[rid].prompt, ref.response)],
                               module.processor.tokenizer.pad_token_id)
        for image, cell in ((Path(ref.path), own[r, 0]), (records[rid].image, swapped[r, 0])):
            with torch.no_grad():
                logits, labels = response_logits(module.model, row["input_ids"], row["attention_mask"],
                                                 image_inputs(module.processor, [image]), row["labels"])
            torch.testing.assert_close(cell, sequence_logps(logits, labels)[0], atol=1e-4, rtol=1e-4)
    first = module._reference_logps(batch, rows)
    hits = module.reference_cache.hits
    again = module._reference_logps(batch, rows)
    assert module.reference_cache.hits - hits == len(row_keys(batch))  # every pair row came from the cache
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(first, values, atol=1e-5, rtol=1e-5)  # untrained: reference = policy


def test_the_pair_terms_average_over_the_draws_with_their_own_response_only():
    from misp.dpo.terms import (
        PairAnchors,
        PairedLogps,
        PairedResponses,
        PairMargin,
        SequenceLogps,
        TermInputs,
    )

    torch.manual_seed(0)
    b, k = 3, 2

    def seq():
        return SequenceLogps(torch.randn(b), torch.randn(b), torch.randn(b, k))

    policy, reference = seq(), seq()
    cells = PairedLogps(torch.randn(b, k), torch.randn(b, k)), PairedLogps(torch.randn(b, k), torch.randn(b, k))
    valid = torch.tensor([[True, False], [True, True], [False, False]])
    full = TermInputs(policy, reference, 0.5, paired=PairedResponses(*cells))
    masked = TermInputs(policy, reference, 0.5, paired=PairedResponses(*cells, valid=valid))
    for term in (ResponsePairs(), PairMargin(), PairAnchors()):
        def column(s: SequenceLogps, j: int) -> SequenceLogps:
            return SequenceLogps(s.chosen, s.rejected, s.negatives[:, j:j + 1])

        per_draw = torch.stack([term(TermInputs(column(policy, j), column(reference, j), 0.5, paired=PairedResponses(
            PairedLogps(cells[0].own[:, j:j + 1], cells[0].swapped[:, j:j + 1]),
            PairedLogps(cells[1].own[:, j:j + 1], cells[1].swapped[:, j:j + 1]))))[0] for j in range(k)], dim=1)
        torch.testing.assert_close(term(full)[0], per_draw.mean(1))
        expected = torch.stack([per_draw[0, 0], per_draw[1].mean(), torch.tensor(0.0)])
        torch.testing.assert_close(term(masked)[0], expected)


IC_TERMS = {
    "pairs_span": {"class_path": "misp.dpo.terms.ResponsePairs", "init_args": {"weight": 0.4375, "token_mask": True}},
    "pair_anchors_span": {"class_path": "misp.dpo.terms.PairAnchors", "init_args": {"weight": 0.4375, "token_mask": True}},
    "pairs_ic": {"class_path": "misp.dpo.terms.ResponsePairs", "init_args": {"weight": 0.1875, "context": "in_context"}},
    "pair_anchors_ic": {"class_path": "misp.dpo.terms.PairAnchors", "init_args": {"weight": 0.1875, "context": "in_context"}},
    "vcdist": {"class_path": "misp.dpo.terms.VCDist", "init_args": {"weight": 0.2}},
}


def _full_icvco() -> Method:
    from misp.dpo.method import build_method

    return build_method({"beta": 0.1, "terms": IC_TERMS, "negatives": {"source": "edits", "k": 1}})


def test_a_single_image_family_refuses_the_two_image_branch_in_one_line(vlm_dir):
    from misp.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=_full_icvco())
    assert "\n" not in str(e.value) and "two-image context" in str(e.value) and "llava" in str(e.value)


def test_the_two_image_rows_read_both_images_and_equal_each_row_alone(edits_records, qwen_dir, tmp_path):
    """IC-VCO's full objective on a family that takes several images: each two-image cell equals its row run
    alone on [m_p, m_k], the reference of those rows is cached, and a step trains every term."""
    from misp.data.pairs import in_context_prompt
    from misp.data.pixel_cache import image_inputs
    from misp.dpo.batching import split_in_context
    from misp.models.forward import response_logits
    from misp.models.prompting import collate_examples, encode_example

    torch.manual_seed(0)
    module = MISPDPOModule(VLMSpec(path=str(qwen_dir)), method=_full_icvco())
    dm = NegativeSamplerDataModule(records_file=str(edits_records), batch_size=2, cache_dir=str(tmp_path / "cache"),
                                   progress=False, preview_records=0, max_length=1024)
    dm.attach(module)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.pairs.in_context is not None and batch.pairs.in_context.input_ids.shape[0] == 4 * 2
    rows = concatenate_rows(batch, module.processor.tokenizer.pad_token_id, 1)
    assert rows.in_context and rows.image_index.shape[0] == 2 * 2 + 3 * 2 + 2 * 4 * 2
    module.model.eval()
    with torch.no_grad():
        values = module._logps(module.model, rows, batch.images)
    cells = split_in_context(values, 2, 1)
    records = {r.id: r for r in dm.records}
    for r, rid in enumerate(batch.ids):
        record, ref = records[rid], batch.negatives[r][0]
        for (anchor, response), cell in zip((("first", record.chosen), ("first", ref.response),
                                             ("second", ref.response), ("second", record.chosen)), cells, strict=True):
            row = collate_examples([encode_example(module.processor, in_context_prompt(record.prompt, anchor), response)],
                                   module.processor.tokenizer.pad_token_id)
            with torch.no_grad():
                logits, labels = response_logits(module.model, row["input_ids"], row["attention_mask"],
                                                 image_inputs(module.processor, [record.image, Path(ref.path)]),
                                                 row["labels"], torch.tensor([0, 1]))
            torch.testing.assert_close(cell[r, 0], sequence_logps(logits, labels)[0], atol=1e-4, rtol=1e-4)
    first = module._reference_logps(batch, rows)
    torch.testing.assert_close(first, values, atol=1e-4, rtol=1e-4)  # untrained: reference = policy
    hits = module.reference_cache.hits
    module._reference_logps(batch, rows)
    assert module.reference_cache.hits - hits == len(row_keys(batch)) == rows.input_ids.shape[0]
    module.model.train()
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
