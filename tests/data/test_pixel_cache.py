"""The pixel cache: bounded, least-recently-used, and bitwise invisible in every batch it serves."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch

from misp.data.pixel_cache import PixelCache, pixel_values
from misp.images import load_rgb
from misp.models.prompting import preprocess_images
from misp.models.vlm import VLMSpec, load_vlm


@pytest.fixture(scope="module")
def processor(vlm_dir):
    return load_vlm(VLMSpec(path=str(vlm_dir)))[1]


def _image_paths(tiny_world, n: int) -> list:
    return sorted((tiny_world / "images").rglob("*.png"))[:n]


def test_the_bound_drops_the_least_recently_used_and_zero_stores_nothing():
    one = torch.zeros(3, 4, 4)  # 192 bytes
    cache = PixelCache(2 * 192)
    cache.put("a", one)
    cache.put("b", one + 1)
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", one + 2)
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.nbytes == 2 * 192 and (cache.hits, cache.misses) == (3, 1)
    cache.put("huge", torch.zeros(3, 8, 8))  # larger than the whole bound: not kept, nothing dropped
    assert cache.get("huge") is None and len(cache) == 2
    off = PixelCache.from_mb(0)
    off.put("a", one)
    assert len(off) == 0 and not off.enabled
    with pytest.raises(ValueError, match="image_cache_mb must be >= 0"):
        PixelCache.from_mb(-1)


def test_a_cached_tensor_owns_its_storage():
    batch = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    cache = PixelCache(10_000)
    cache.put("a", batch[1])
    batch.zero_()  # the caller's batch may be written to, and must not stay alive through a view
    assert cache.get("a").sum() > 0 and cache.get("a").untyped_storage().nbytes() == 3 * 4 * 4 * 4


def test_pickling_hands_over_an_empty_cache_with_the_same_bound():
    cache = PixelCache(1000)
    cache.put("a", torch.zeros(3, 2, 2))
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.max_bytes == 1000 and len(copy) == 0 and len(cache) == 1


def test_cold_and_warm_batches_are_bitwise_those_without_the_cache(tiny_world, processor):
    paths = _image_paths(tiny_world, 12)
    assert len(paths) == 12
    reference = preprocess_images(processor, [load_rgb(p) for p in paths])
    cache = PixelCache.from_mb(16)
    cold = pixel_values(processor, paths, cache)
    warm = pixel_values(processor, paths, cache)
    assert cache.hits == 12 and cache.misses == 12
    # Half hits, half misses, in another order and with an in-memory image among them.
    mixed_refs = [paths[3], load_rgb(paths[0]), *_image_paths(tiny_world, 16)[12:], paths[7]]
    mixed = pixel_values(processor, mixed_refs, cache)
    expected = preprocess_images(processor, [load_rgb(r) if not hasattr(r, "mode") else r for r in mixed_refs])
    for got in (cold, warm, pixel_values(processor, paths, None)):
        assert got.dtype == reference.dtype and torch.equal(got, reference)
    assert torch.equal(mixed, expected)
    assert len(cache) == 16  # the in-memory image was not cached


def test_another_processor_empties_the_cache(tiny_world, processor):
    paths = _image_paths(tiny_world, 2)
    cache = PixelCache.from_mb(16)
    pixel_values(processor, paths, cache)
    other = SimpleNamespace(image_processor=processor.image_processor)
    pixel_values(other, paths[:1], cache)
    assert len(cache) == 1 and cache.hits == 0


def test_sft_batches_are_bitwise_the_same_with_and_without_the_cache(tiny_world, processor):
    from misp.data.sft_data import SFTDataModule

    def data(mb: int) -> SFTDataModule:
        dm = SFTDataModule(train_file=str(tiny_world / "sft.jsonl"), batch_size=8, image_cache_mb=mb)
        dm.attach(SimpleNamespace(processor=processor))
        dm.setup("fit")
        return dm

    off, on = data(0), data(64)
    order = torch.randperm(len(on.train_set), generator=torch.Generator().manual_seed(0))[:64].tolist()
    batches = [order[i : i + 8] for i in range(0, 64, 8)]
    for _epoch in range(2):  # cold, then warm
        for rows in batches:
            a = off._collate([off.train_set[i] for i in rows])
            b = on._collate([on.train_set[i] for i in rows])
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["ids"] == b["ids"]
            assert torch.equal(a["input_ids"], b["input_ids"])
    assert on.pixel_cache.hits > 0 and len(off.pixel_cache) == 0
    assert on.train_dataloader().persistent_workers is False  # no workers: the cache lives in this process
    on.hparams.num_workers = 2
    assert on.train_dataloader().persistent_workers is True  # workers keep their caches across epochs


def test_preference_batches_cache_files_but_never_crops(tiny_world, processor, tmp_path):
    from misp.data.negative_sampler import NegativeSamplerDataModule
    from misp.negatives.spec import Negatives

    def data(mb: int) -> NegativeSamplerDataModule:
        dm = NegativeSamplerDataModule(records_file=str(tiny_world / "pref.jsonl"),
                                       cache_dir=str(tmp_path / "cache"), batch_size=4, progress=False,
                                       preview_records=0, image_cache_mb=mb)
        dm.attach(SimpleNamespace(processor=processor, negatives=Negatives("crop", 2)))
        dm.prepare_data()
        dm.setup("fit")
        return dm

    off, on = data(0), data(64)
    for _epoch in range(2):
        for a, b in zip(off.train_dataloader(), on.train_dataloader(), strict=True):
            assert torch.equal(a.images.tensors["pixel_values"], b.images.tensors["pixel_values"])
            assert a.negatives == b.negatives
    item = on.train_dataloader().dataset[0]
    assert not hasattr(item["positive"], "mode") and all(hasattr(n, "mode") for n in item["negatives"])
    # Only the positives (files) are cached, each once; the crops, made in memory, never are.
    positives = {str(r.image) for r in on.records}
    assert on.pixel_cache.hits > 0 and set(on.pixel_cache._entries) <= positives
