"""SymMPO and IC-VCO fit end to end on a tiny format-6 world: edits drawn with their own captions, the pair
rows run through the policy and the reference, and the pair terms trained on."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import torch

from misp.cli import main
from misp.demo import method_configs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def edits_world(tmp_path_factory):
    """A few records of the Shapes world with object edits (format 6), and a tiny LLaVA over its words."""
    from misp.smoke import SMOKE_WORLD, smoke_vlm
    from misp.world import WorldConfig, write_world

    root = tmp_path_factory.mktemp("edits_world")
    config = SMOKE_WORLD | dict(n_clip=8, n_sft=8, n_pool=8, n_pref=8, n_test=4, n_val=4, object_edits=2)
    write_world(root / "world", WorldConfig(**config), progress=False)
    return root / "world", smoke_vlm(root / "world", root / "vlm")


def _fit(method: str, world: Path, vlm: Path, tmp_path: Path, *extra: str) -> list[dict]:
    main([
        "fit", *method_configs(method, ROOT),
        f"--model.init_args.vlm.path={vlm}",
        f"--data.records_file={world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={world / 'test.jsonl'}",
        f"--data.validation.pope_file={world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={world / 'val.jsonl'}",
        "--data.batch_size=2", "--data.progress=false", "--data.preview_records=0",
        "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
    ])
    files = sorted((tmp_path / "runs").rglob("metrics.csv"))
    assert files
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def _logged(rows: list[dict]) -> set[str]:
    return {k for r in rows for k, v in r.items() if v}


def _losses(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([float(r["train/loss"]) for r in rows if r.get("train/loss")])


@pytest.mark.slow
def test_symmpo_fits_on_the_worlds_captioned_edits(edits_world, tmp_path, monkeypatch):
    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    rows = _fit("symmpo", world, vlm, tmp_path, "--model.init_args.method.negatives.k=2")
    assert {"loss/text", "loss/pairs", "loss/margin", "loss/pair_anchors", "pairs/accuracy_edit"} <= _logged(rows)
    losses = _losses(rows)
    assert len(losses) == 2 and torch.isfinite(losses).all()
    # Untrained, policy = reference: every pair's logit is 0, so L_pairs = 2 log 2 at the first step.
    first = next(r for r in rows if r.get("loss/pairs"))
    assert float(first["loss/pairs"]) == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-4)


def test_icvco_trains_on_the_tokens_each_edit_changes(edits_world, tmp_path):
    """IC-VCO's single-image step on the world's captioned edits: the spans follow the rule (what is left once the
    common prefix and suffix are stripped), the per-token cells sum to the summed ones, and the untrained loss is
    the release's value at policy = reference."""
    from misp.data.negative_sampler import NegativeSamplerDataModule
    from misp.data.pairs import response_ids
    from misp.dpo import MISPDPOModule
    from misp.dpo.batching import concatenate_rows, split_pair_rows, split_rows
    from misp.dpo.method import Method
    from misp.dpo.pairs import TokenReferenceCache, edit_spans
    from misp.models.vlm import VLMSpec

    world, vlm = edits_world
    module = MISPDPOModule(VLMSpec(path=str(vlm)), method=Method.preset("icvco"))
    dm = NegativeSamplerDataModule(records_file=str(world / "pref.jsonl"), batch_size=4, progress=False,
                                   cache_dir=str(tmp_path / "cache"), preview_records=0)
    dm.attach(module)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    pairs, tokenizer = batch.pairs, module.processor.tokenizer
    records = {r.id: r for r in dm.records}
    for r, rid in enumerate(batch.ids):
        ref = batch.negatives[r][0]
        chosen = response_ids({"labels": tokenizer(records[rid].chosen)["input_ids"]})
        chosen_labels = batch.chosen.labels[r][batch.chosen.labels[r] != -100].tolist()
        own_labels = pairs.responses.labels[r][pairs.responses.labels[r] != -100].tolist()
        chosen_mask = pairs.chosen_span[r, 0, : len(chosen_labels)].tolist()
        own_mask = pairs.own_span[r, 0, : len(own_labels)].tolist()
        kept_c = [t for t, m in zip(chosen_labels, chosen_mask, strict=True) if not m]
        kept_o = [t for t, m in zip(own_labels, own_mask, strict=True) if not m]
        assert kept_c == kept_o and chosen  # outside the spans the two responses are the same tokens
        changed = tokenizer.decode([t for t, m in zip(own_labels, own_mask, strict=True) if m])
        assert changed.strip() in ref.response  # the span is a piece of the edit's own caption
    rows = concatenate_rows(batch, tokenizer.pad_token_id, 1)
    with torch.no_grad():
        tokens = module._token_logps(module.model, rows, batch.images)
        summed = module._logps(module.model, rows, batch.images)
    cells = edit_spans(batch, tokens, tokens).policy
    own, swapped = split_pair_rows(summed, 4, 1)
    chosen, _, chosen_edit = split_rows(summed, 4, 1)
    for got, want in ((cells.own.sum(-1), own), (cells.swapped.sum(-1), swapped), (cells.chosen.sum(-1), chosen),
                      (cells.chosen_edit.sum(-1), chosen_edit)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the reference's tokens: computed once, then from the token cache, which survives a weights-only checkpoint
    reference = module._reference_token_logps(batch, rows, tokens.shape[1])
    torch.testing.assert_close(reference, tokens, atol=1e-5, rtol=1e-5)  # untrained: reference = policy
    hits = module.reference_token_cache.hits
    torch.testing.assert_close(module._reference_token_logps(batch, rows, tokens.shape[1]), reference)
    assert module.reference_token_cache.hits - hits == rows.input_ids.shape[0]
    buffer = io.BytesIO()
    torch.save(module.reference_token_cache.state_dict(), buffer)
    buffer.seek(0)
    restored = TokenReferenceCache()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.values == module.reference_token_cache.values
    loss = module.training_step(batch, 0)
    # policy = reference: every pair logit is 0 and every anchor -log sigma(0); 1.75/4 (two pairs + two anchors)
    assert float(loss) == pytest.approx(0.4375 * 4 * math.log(2), abs=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())


def _fit_ground(world: Path, vlm: Path, clip_dir, sae_dir, tmp_path: Path, monkeypatch, *extra: str):
    """misp_ground fitted on the tiny world's mixed pool: the logged rows and every training batch it saw."""
    from misp.dpo import module as dpo_module

    seen = []
    step = dpo_module.MISPDPOModule.training_step

    def recorded(self, batch, i):
        seen.append(batch)
        return step(self, batch, i)

    monkeypatch.setattr(dpo_module.MISPDPOModule, "training_step", recorded)
    rows = _fit("misp_ground", world, vlm, tmp_path, f"--data.pool={world / 'pool.jsonl'}",
                f"--data.clip.checkpoint={clip_dir}", f"--data.sae_path={sae_dir}", "--data.mining.n_candidates=8",
                "--data.mining.pool_size=6", "--data.mining.dup_threshold=0.99999", *extra)
    return rows, seen


@pytest.mark.slow
def test_misp_ground_fits_on_the_mixed_pool_and_pairs_only_the_edits(edits_world, clip_dir, sae_dir, tmp_path,
                                                                      monkeypatch):
    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    rows, seen = _fit_ground(world, vlm, clip_dir, sae_dir, tmp_path, monkeypatch)
    assert {"loss/image", "loss/text", "loss/anchor", "loss/pairs", "loss/proposal", "cool/weight_mean",
            "is/ess"} <= _logged(rows)
    assert torch.isfinite(_losses(rows)).all()
    refs = [ref for batch in seen for record in batch.negatives for ref in record]
    edits = [ref for ref in refs if ref.response is not None]
    assert edits and all("pref_cf" in ref.path for ref in edits)  # only the record's own edits carry a caption
    assert all(ref.response is None for ref in refs if "pref_cf" not in ref.path)
    for batch in seen:
        flags = batch.pairs.valid
        expected = torch.tensor([[ref.response is not None for ref in r] for r in batch.negatives])
        assert torch.equal(flags, expected) if flags is not None else bool(expected.all())


@pytest.mark.slow
def test_misp_ground_with_partner_draws_draws_a_partner_edit_first_every_epoch(edits_world, clip_dir, sae_dir,
                                                                               tmp_path, monkeypatch):
    """source: sae_targets keeps each record's partner edits among its selected negatives and draws one of them
    first, with the stratified log q that the image term and q_phi's fit read."""
    import json

    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    targets = {}
    for line in (world / "pref.jsonl").read_text().splitlines():
        record = json.loads(line)
        targets[record["id"]] = {Path(item["image"]).name for item in record["meta"]["captioned_counterfactuals"]
                                 if item.get("partner")}
    assert any(targets.values()) and not all(targets.values())
    rows, seen = _fit_ground(world, vlm, clip_dir, sae_dir, tmp_path, monkeypatch,
                             "--model.init_args.method.negatives.source=sae_targets", "--trainer.max_steps=4")
    assert {"loss/image", "loss/pairs", "loss/proposal", "is/ess"} <= _logged(rows)
    assert torch.isfinite(_losses(rows)).all()
    checked = 0
    for batch in seen:
        for rid, refs in zip(batch.ids, batch.negatives, strict=True):
            drawn = [Path(ref.path).name for ref in refs]
            if targets[rid]:
                checked += 1
                assert drawn[0] in targets[rid] and refs[0].response is not None
                assert not set(drawn[1:]) & targets[rid]
            else:
                assert not set(drawn) & {n for t in targets.values() for n in t}
    assert checked


@pytest.mark.slow
def test_misp_ground_with_the_span_mask_pairs_only_the_tokens_each_edit_changes(edits_world, clip_dir, sae_dir,
                                                                                tmp_path, monkeypatch):
    """configs/experiments/ablations/pairs_span.yaml on misp_ground: the pair term reads the edited span of each
    captioned draw (a piece of the edit's own caption), and a retrieved draw has no span and no pair."""
    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    rows, seen = _fit_ground(world, vlm, clip_dir, sae_dir, tmp_path, monkeypatch,
                             "--config", str(ROOT / "configs/experiments/ablations/pairs_span.yaml"))
    assert {"loss/image", "loss/anchor", "loss/pairs_span", "loss/proposal"} <= _logged(rows)
    assert "loss/pairs" not in _logged(rows)
    assert torch.isfinite(_losses(rows)).all()
    spans = 0
    for batch in seen:
        own = batch.pairs.own_span
        for r, refs in enumerate(batch.negatives):
            for k, ref in enumerate(refs):
                if ref.response is None:
                    assert not own[r, k].any()  # a retrieved image: nothing to pair
                else:
                    spans += int(own[r, k].any())
    assert spans


@pytest.mark.slow
def test_misp_ground_with_pair_anchors_anchors_the_drawn_edits_own_captions(edits_world, clip_dir, sae_dir, tmp_path,
                                                                           monkeypatch):
    """The experiment's ground_pair_anchors layers (partner draws, then SymMPO's two anchors) on misp_ground: the
    anchor term trains beside the pair term, and at policy = reference each of its two anchors is log 2."""
    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    rows, seen = _fit_ground(world, vlm, clip_dir, sae_dir, tmp_path, monkeypatch,
                             "--config", str(ROOT / "configs/experiments/ablations/targets.yaml"),
                             "--config", str(ROOT / "configs/experiments/ablations/pair_anchors.yaml"))
    assert {"loss/pairs", "loss/pair_anchors", "loss/anchor", "loss/image"} <= _logged(rows)
    first = next(float(r["loss/pair_anchors"]) for r in rows if r.get("loss/pair_anchors"))
    # the first step (policy = reference): 2 log 2 for each row that drew an edit, 0 for one that drew none
    paired = sum(any(ref.response is not None for ref in refs) for refs in seen[0].negatives) / len(seen[0].ids)
    assert 0 < paired and first == pytest.approx(2 * math.log(2) * paired, abs=1e-4)
    assert torch.isfinite(_losses(rows)).all()
