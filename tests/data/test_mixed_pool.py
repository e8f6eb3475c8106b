"""The mixed candidate pool (``mining.record_candidates``): each record's own images beside its retrieved ones."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from misp.data.negative_sampler import NegativeSamplerDataModule
from misp.dpo import MISPDPOModule
from misp.dpo.method import Method
from misp.models.clip import ClipSpec, load_clip
from misp.models.vlm import VLMSpec
from misp.negatives.embed import embed_images, embed_texts
from misp.negatives.mining import MiningConfig, merge_own_candidates, own_image_index
from misp.negatives.spec import Negatives

# A random-init CLIP maps all Shapes images within cosine ~0.99 of each other: keep them all as candidates.
MINING = MiningConfig(n_candidates=8, pool_size=4, embed_batch_size=64, dup_threshold=0.99999)
MIXED = replace(MINING, record_candidates="counterfactual")


def make(tiny_world, clip_dir, tmp_path, mining=MIXED, source="random", k=3, **kwargs) -> NegativeSamplerDataModule:
    defaults = dict(records_file=str(tiny_world / "pref.jsonl"), cache_dir=str(tmp_path / "cache"), batch_size=4,
                    mining=mining, progress=False, preview_records=0,
                    pool=str(tiny_world / "pool.jsonl"), clip=ClipSpec(checkpoint=str(clip_dir)))
    dm = NegativeSamplerDataModule(**(defaults | kwargs))
    dm.attach(SimpleNamespace(negatives=Negatives(source, k)))  # a stand-in module whose method draws these
    dm.prepare_data()
    return dm


def renders(tiny_world, dm) -> list[list[Path]]:
    """Each record's counterfactual renders, read from the records file itself."""
    rows = [json.loads(line) for line in (tiny_world / "pref.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in dm.records]
    return [[tiny_world / p for p in r["meta"]["counterfactuals"]] for r in rows]


def test_each_records_candidates_hold_its_renders_with_exact_differences(tiny_world, clip_dir, tmp_path):
    dm = make(tiny_world, clip_dir, tmp_path)
    c = dm.candidates
    own = renders(tiny_world, dm)
    assert all(own)
    assert c.indices.shape[1] == MINING.n_candidates + max(map(len, own))
    clip = load_clip(ClipSpec(checkpoint=str(clip_dir)))
    for r in (0, 7, len(own) - 1):
        files = [c.paths[i].resolve() for i in c.indices[r].tolist() if i >= 0]
        assert {p.resolve() for p in own[r]} <= set(files)
        # e(m, x) = vec(h_v(m) h_t(x)^T) with CLIP run here directly, no cache (method.md 2).
        h_p = embed_images(clip, [dm.records[r].image], progress=False)[0]
        h_t = embed_texts(clip, [dm.records[r].prompt], progress=False)[0]
        h_n = embed_images(clip, own[r], progress=False)
        d = c.differences(torch.tensor([r]))[0]
        for j, render in enumerate(own[r]):
            col = files.index(render.resolve())
            explicit = torch.outer(h_p, h_t).flatten() - torch.outer(h_n[j], h_t).flatten()
            torch.testing.assert_close(d[col], explicit, rtol=1e-4, atol=1e-6)
            # The CLIP cosine feature of the render is its true cosine to the positive.
            torch.testing.assert_close(c.sims[r, col], h_p @ h_n[j], rtol=1e-4, atol=1e-6)
    # Best first, padding last, no candidate twice.
    assert bool((c.sims[:, :-1] >= c.sims[:, 1:]).all())
    for row in c.indices.tolist():
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real)) and row[len(real):] == [-1] * (len(row) - len(real))


def test_own_images_bypass_the_near_duplicate_filter(tiny_world, clip_dir, tmp_path):
    """With a threshold that drops every pool image the records' own renders are all that is left (and
    mining does not fail for want of candidates): they are edits by construction, never duplicates."""
    strict = replace(MIXED, dup_threshold=0.01)
    dm = make(tiny_world, clip_dir, tmp_path, mining=strict)
    own = renders(tiny_world, dm)
    for r, row in enumerate(dm.candidates.indices.tolist()):
        assert {dm.candidates.paths[i].resolve() for i in row if i >= 0} == {p.resolve() for p in own[r]}
    valid = dm.candidates.indices >= 0
    assert bool((dm.candidates.sims[valid] > strict.dup_threshold).all())  # "duplicates" by the threshold, kept
    with pytest.raises(ValueError, match="no candidate in the pool"):
        make(tiny_world, clip_dir, tmp_path, mining=replace(strict, record_candidates="none"))


def test_the_sae_selects_renders_and_the_sae_source_draws_them(tiny_world, clip_dir, sae_dir, tmp_path):
    dm = make(tiny_world, clip_dir, tmp_path, source="sae", sae_path=str(sae_dir))
    c, sel = dm.candidates, dm.selection
    own = c.is_own(sel.pool_index)
    assert bool(own.any()) and bool((~own & sel.valid).any())  # a mix: the SAE picks both kinds
    # Each selected index is one of the record's candidates, and what is_own says matches the files.
    renders_of = [{p.resolve() for p in x} for x in renders(tiny_world, dm)]
    for r in range(len(dm.records)):
        picked = [i for i in sel.pool_index[r].tolist() if i >= 0]
        assert set(picked) <= set(c.indices[r].tolist())
        assert [c.paths[i].resolve() in renders_of[r] for i in picked] == own[r, : len(picked)].tolist()
    drawn = dm.draws_for_epoch(0)
    chosen = [{str(c.paths[i]) for i in row.tolist() if i >= 0} for row in sel.pool_index]
    assert all({ref.path for ref in refs} <= ch for refs, ch in zip(drawn.refs, chosen, strict=True))
    assert any(Path(ref.path).resolve() in renders_of[r] for r, refs in enumerate(drawn.refs) for ref in refs)


def test_the_random_source_draws_from_the_mixed_list(tiny_world, clip_dir, tmp_path):
    dm = make(tiny_world, clip_dir, tmp_path, k=8)
    renders_of = [{p.resolve() for p in x} for x in renders(tiny_world, dm)]
    drawn = dm.draws_for_epoch(0)
    n_valid = (dm.candidates.indices >= 0).sum(1, keepdim=True).double()
    torch.testing.assert_close(drawn.log_q.double(), (-n_valid.log()).expand_as(drawn.log_q), atol=1e-6, rtol=0)
    assert any(Path(ref.path).resolve() in renders_of[r] for r, refs in enumerate(drawn.refs) for ref in refs)


def test_the_setting_keys_the_caches(tiny_world, clip_dir, sae_dir, tmp_path, monkeypatch):
    import misp.negatives.mining as mining

    kwargs = dict(source="sae", sae_path=str(sae_dir))
    plain = make(tiny_world, clip_dir, tmp_path, mining=MINING, **kwargs)
    mixed = make(tiny_world, clip_dir, tmp_path, **kwargs)
    assert plain.candidates.key != mixed.candidates.key
    assert not bool(plain.candidates.is_own(plain.selection.pool_index).any())
    assert bool(mixed.candidates.is_own(mixed.selection.pool_index).any())  # not the pool-only selection's cache
    # Back to the pool alone: the same key as before, the cached selection reused and not rebuilt.
    calls = []
    monkeypatch.setattr(mining, "select_chunk", lambda *a, **k: calls.append(1))
    again = make(tiny_world, clip_dir, tmp_path, mining=MINING, **kwargs)
    assert calls == [] and again.candidates.key == plain.candidates.key
    assert torch.equal(again.selection.pool_index, plain.selection.pool_index)
    # Other renders (here: fewer per record) are other candidates, whatever the setting's name.
    rows = [json.loads(line) for line in (tiny_world / "pref.jsonl").read_text().splitlines()]
    for row in rows:
        row["meta"]["counterfactuals"] = row["meta"]["counterfactuals"][:2]
    fewer = tmp_path / "pref_fewer.jsonl"
    fewer.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.undo()
    other = make(tiny_world, clip_dir, tmp_path, records_file=str(fewer), image_root=str(tiny_world), **kwargs)
    assert other.candidates.key != mixed.candidates.key


def test_sae_mode_trains_on_the_mixed_differences(tiny_world, clip_dir, tmp_path):
    dm = make(tiny_world, clip_dir, tmp_path, serve="differences", sae_batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (16, dm.difference_dim) and torch.isfinite(batch).all()
    pairs = dm.candidates.valid_pairs()
    own = dm.candidates.is_own(dm.candidates.indices)
    assert int(own[pairs[:, 0], pairs[:, 1]].sum()) == sum(map(len, renders(tiny_world, dm)))
    assert dm.sae_metadata()["candidates"] == dm.candidates.key


@pytest.mark.parametrize("kind,what", [("counterfactual", "meta.counterfactuals"), ("given", "negatives")])
def test_a_list_the_records_lack_is_an_error_naming_the_file(kind, what, tiny_world, clip_dir, tmp_path):
    rows = [json.loads(line) for line in (tiny_world / "pref.jsonl").read_text().splitlines()]
    for row in rows:
        row["meta"].pop("counterfactuals")
    records = tmp_path / "pref_plain.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mining = replace(MINING, record_candidates=kind)
    with pytest.raises(ValueError, match=re.escape(f"no record in {records} carries a `{what}`")) as info:
        make(tiny_world, clip_dir, tmp_path, mining=mining, records_file=str(records), image_root=str(tiny_world))
    assert rows[0]["id"] in str(info.value)
    with pytest.raises(ValueError, match="mining.record_candidates must be one of"):
        MiningConfig(record_candidates="pool")


def test_merge_keeps_an_own_image_that_is_also_retrieved_once():
    pool = [Path(f"/p{i}.png") for i in range(4)]
    extra, own = own_image_index([[Path("/p2.png"), Path("/e.png"), Path("/e.png")], []], pool)
    assert extra == [Path("/e.png")] and own.tolist() == [[2, 4], [-1, -1]]
    images = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1)
    image = images[:2] + 0.1
    retrieved = torch.tensor([[2, 1], [3, -1]])
    sims = torch.tensor([[0.9, 0.5], [0.7, float("-inf")]])
    indices, merged = merge_own_candidates(image, images, own, retrieved, sims)
    assert sorted(i for i in indices[0].tolist() if i >= 0) == [1, 2, 4]
    assert indices[1].tolist() == [3, -1, -1, -1]
    assert bool((merged[:, :-1] >= merged[:, 1:]).all())


@pytest.mark.slow
def test_misp_dpo_trains_on_the_mixed_pool(tiny_world, clip_dir, sae_dir, vlm_dir, tmp_path):
    L.seed_everything(0)
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("misp_dpo"), lr=1e-3)
    dm = NegativeSamplerDataModule(
        records_file=str(tiny_world / "pref.jsonl"), pool=str(tiny_world / "pool.jsonl"),
        clip=ClipSpec(checkpoint=str(clip_dir)), sae_path=str(sae_dir), mining=MIXED, batch_size=8,
        cache_dir=str(tmp_path / "cache"), progress=False, preview_records=2,
    )
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(max_steps=3, limit_val_batches=0, accelerator="cpu", log_every_n_steps=1, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    dm.attach(module)
    before = module.proposal.w.detach().clone()
    trainer.fit(module, datamodule=dm)
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in metrics[1:]]
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any(r.get("is/ess") for r in rows)
    own_share = [float(r["negatives/selected_own"]) for r in rows if r.get("negatives/selected_own")]
    assert own_share and 0 < own_share[0] < 1
    assert not torch.equal(module.proposal.w.detach(), before)  # q_phi trained over the mixed selection


def test_records_without_the_list_keep_their_retrieved_candidates_with_a_counted_warning(
    tiny_world, clip_dir, tmp_path, caplog
):
    import logging

    rows = [json.loads(line) for line in (tiny_world / "pref.jsonl").read_text().splitlines()]
    for row in rows[:5]:
        row["meta"].pop("counterfactuals")
    records = tmp_path / "pref_some.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        dm = make(tiny_world, clip_dir, tmp_path, records_file=str(records), image_root=str(tiny_world))
    assert f"5 of {len(rows)} records in {records} carry no `meta.counterfactuals`" in caplog.text
    own = dm.candidates.is_own(dm.candidates.indices)
    assert not bool(own[:5].any()) and bool(own[5:].any(1).all())
