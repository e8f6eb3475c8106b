"""NegativeSamplerDataModule: SAE-mode difference vectors, every DPO negative source, per-epoch draws."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from misp.data.handshake import NotAttachedError
from misp.data.negative_sampler import NegativeSamplerDataModule
from misp.errors import ConfigError
from misp.models.clip import ClipSpec
from misp.models.prompting import num_image_tokens
from misp.models.vlm import VLMSpec, load_vlm
from misp.negatives.mining import MiningConfig
from misp.negatives.spec import Negatives

# A random-init CLIP maps all Shapes images within cosine ~0.99 of each other: keep them all as candidates.
MINING = MiningConfig(n_candidates=8, pool_size=4, embed_batch_size=64, dup_threshold=0.99999)


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return load_vlm(VLMSpec(path=str(vlm_dir)))[1]


def make(tiny_world, tmp_path, source: str | None = None, k: int = 0, processor=None, **kwargs) -> NegativeSamplerDataModule:
    """The datamodule; given a ``source``, attached to a stand-in module whose method draws ``k`` from it."""
    defaults = dict(records_file=str(tiny_world / "pref.jsonl"), cache_dir=str(tmp_path / "cache"), batch_size=4,
                    mining=MINING, progress=False, preview_records=0)
    dm = NegativeSamplerDataModule(**(defaults | kwargs))
    if source is not None:
        dm.attach(SimpleNamespace(processor=processor, negatives=Negatives(source, k)))
    return dm


def test_sae_mode_serves_exact_difference_vectors(tiny_world, clip_dir, tmp_path):
    dm = make(tiny_world, tmp_path, serve="differences", pool=str(tiny_world / "pool.jsonl"),
              clip=ClipSpec(checkpoint=str(clip_dir)), sae_batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    c = dm.candidates
    assert dm.difference_dim == c.image.shape[1] * c.text.shape[1]  # small CLIP: no projection
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (16, dm.difference_dim)
    # d = e(m_p, x) - e(m_i, x) with e the flattened outer product (method.md section 2).
    r, col = 3, 2
    pool_i = int(c.indices[r, col])
    explicit = torch.outer(c.image[r], c.text[r]).flatten() - torch.outer(c.pool[pool_i], c.text[r]).flatten()
    torch.testing.assert_close(c.pair_differences(torch.tensor([[r, col]]))[0], explicit)
    # Train and validation pairs come from disjoint records.
    train, val = dm._sae_split()
    assert set(train[:, 0].tolist()).isdisjoint(val[:, 0].tolist()) and len(val) > 0


def test_mining_is_cached_and_rebuilt_when_the_pool_changes(tiny_world, clip_dir, tmp_path, monkeypatch):
    import misp.negatives.mining as mining

    kwargs = dict(serve="differences", pool=str(tiny_world / "pool.jsonl"), clip=ClipSpec(checkpoint=str(clip_dir)))
    make(tiny_world, tmp_path, **kwargs).prepare_data()
    calls = []
    real = mining.retrieve_candidates
    monkeypatch.setattr(mining, "retrieve_candidates", lambda *a, **k: calls.append(1) or real(*a, **k))
    dm = make(tiny_world, tmp_path, **kwargs)
    dm.prepare_data()
    assert calls == []  # everything came from the cache
    smaller = tmp_path / "pool_small.jsonl"
    smaller.write_text("".join((tiny_world / "pool.jsonl").read_text().splitlines(keepends=True)[:60]))
    rows = [line.replace('"images/', f'"{tiny_world}/images/') for line in smaller.read_text().splitlines(keepends=True)]
    smaller.write_text("".join(rows))
    dm = make(tiny_world, tmp_path, **(kwargs | {"pool": str(smaller)}))
    dm.prepare_data()
    assert calls == [1] and dm.candidates.pool.shape[0] == 60


@pytest.mark.parametrize("source,k", [("random", 3), ("sae", 3), ("crop", 1), ("noise", 1), ("counterfactual", 2)])
def test_every_source_yields_batches_of_the_right_shape(source, k, tiny_world, clip_dir, sae_dir, processor, tmp_path):
    extra = {}
    if source in ("random", "sae"):
        extra = dict(pool=str(tiny_world / "pool.jsonl"), clip=ClipSpec(checkpoint=str(clip_dir)))
    if source == "sae":
        extra["sae_path"] = str(sae_dir)
    dm = make(tiny_world, tmp_path, source=source, k=k, processor=processor, **extra)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b = batch.batch_size
    size = processor.image_processor.crop_size["height"]
    assert batch.k == k and len(batch.negatives) == b and all(len(refs) == k for refs in batch.negatives)
    assert all(ref.source == source for refs in batch.negatives for ref in refs)
    assert batch.images.tensors["pixel_values"].shape == (b + b * k, 3, size, size)
    assert batch.images.tokens_per_image.tolist() == [num_image_tokens(processor)] * (b + b * k)
    assert batch.log_q.shape == (b, k) and torch.isfinite(batch.log_q).all()
    assert batch.chosen.input_ids.shape[0] == b and batch.rejected.labels.shape[0] == b
    if source == "sae":
        # q_phi's features reach the module through the handshake, by record, not in the batch.
        features, valid = dm.describe().negatives.proposal_features().for_records(batch.ids, "cpu")
        assert features.shape == (b, MINING.pool_size, 4) and valid.shape == (b, MINING.pool_size)
        rows = [next(i for i, r in enumerate(dm.records) if r.id == rid) for rid in batch.ids]
        assert torch.equal(features, dm.selection.features[rows])
        assert (batch.log_q <= 0).all()


def test_draws_repeat_for_the_same_epoch_and_change_across_epochs(tiny_world, clip_dir, sae_dir, tmp_path):
    kwargs = dict(source="sae", k=3, pool=str(tiny_world / "pool.jsonl"), clip=ClipSpec(checkpoint=str(clip_dir)),
                  sae_path=str(sae_dir))
    dm = make(tiny_world, tmp_path, **kwargs)
    dm.prepare_data()
    again = make(tiny_world, tmp_path, **kwargs)
    again.prepare_data()
    e0, e0_again, e1 = dm.draws_for_epoch(0), again.draws_for_epoch(0), dm.draws_for_epoch(1)
    assert e0.refs == e0_again.refs
    assert torch.equal(e0.draw_index, e0_again.draw_index)
    assert not torch.equal(e0.draw_index, e1.draw_index)
    # Every drawn negative is one of the record's SAE-selected pool images.
    for r, refs in enumerate(e0.refs):
        chosen = {(str(dm.pool_paths[i]), i) for i in dm.selection.pool_index[r].tolist() if i >= 0}
        assert {(ref.path, ref.index) for ref in refs} <= chosen


def test_transform_sources_follow_seed_and_epoch(tiny_world, tmp_path):
    dm = make(tiny_world, tmp_path, source="crop", k=2)
    dm.prepare_data()
    assert dm.draws_for_epoch(0).refs == dm.draws_for_epoch(0).refs
    assert dm.draws_for_epoch(0).refs != dm.draws_for_epoch(1).refs
    assert all(ref.source == "crop" and ref.seed is not None and not ref.names_file for ref in dm.draws_for_epoch(0).refs[0])


def test_configuration_errors_are_clear(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="source='random' needs data.init_args.pool and data.init_args.clip"):
        make(tiny_world, tmp_path, source="random", k=3)
    with pytest.raises(ConfigError, match="needs data.init_args.sae_path"):
        make(tiny_world, tmp_path, source="sae", k=3, pool="p", clip=ClipSpec(checkpoint="c"))
    with pytest.raises(ValueError, match="unknown negative source .bogus.; registered"):
        make(tiny_world, tmp_path, source="bogus", k=1)
    with pytest.raises(ValueError, match="serve='differences' needs both `pool` and `clip`"):
        make(tiny_world, tmp_path, serve="differences")
    # Serving preferences without the handshake: one line saying so, not a silent default.
    with pytest.raises(NotAttachedError, match="has no module's negatives"):
        make(tiny_world, tmp_path).prepare_data()


def test_given_source_draws_from_each_records_own_negatives(tiny_world, processor, tmp_path):
    import json

    rows = [json.loads(line) for line in (tiny_world / "pref.jsonl").read_text().splitlines()]
    for row in rows:  # the record's own negatives: here, its counterfactual renders
        row["negatives"] = row["meta"]["counterfactuals"][:2]
    records = tiny_world / "pref_given.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make(tiny_world, tmp_path, records_file=str(records), source="given", k=3, processor=processor)
    dm.prepare_data()
    dm.setup("fit")
    draws = dm.draws_for_epoch(0)
    for record, refs in zip(dm.records, draws.refs, strict=True):
        assert {ref.path for ref in refs} <= {str(p) for p in record.negatives}
    torch.testing.assert_close(draws.log_q, torch.full_like(draws.log_q, -torch.log(torch.tensor(2.0)).item()))
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.tensors["pixel_values"].shape[0] == len(batch.ids) * 4


def test_preference_data_validates_on_validation_and_tests_on_evaluation(tiny_world, tmp_path):
    from misp.data.eval_data import EvalData

    evaluation = EvalData(pope_file=str(tiny_world / "pope.jsonl"), captions_file=str(tiny_world / "test.jsonl"))
    validation = EvalData(pope_file=str(tiny_world / "val_pope.jsonl"), captions_file=str(tiny_world / "val.jsonl"))
    dm = make(tiny_world, tmp_path, source="none", evaluation=evaluation, validation=validation, val_limit=4)

    def ids(loaders):
        return {loader.dataset.task: {row["id"].split("-")[0] for row in loader.dataset.rows} for loader in loaders}

    val, test = dm.val_dataloader(), dm.test_dataloader()
    assert ids(val) == {"pope": {"val_pope"}, "caption": {"val"}, "mmvp": {"val_mmvp"}, "likelihood": {"val"}}
    assert ids(test) == {"pope": {"pope"}, "caption": {"test"}, "mmvp": {"mmvp"}, "likelihood": {"test"}}
    assert [len(loader.dataset) for loader in val] == [12, 4, 4, 4]  # val_limit: per POPE split, then each set
    assert len(test[1].dataset) == 24
    # Without `validation`, fit validates on `evaluation`, as before.
    assert ids(make(tiny_world, tmp_path, source="none", evaluation=evaluation).val_dataloader()) == ids(test)
