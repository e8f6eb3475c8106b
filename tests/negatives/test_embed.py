from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from open_clip import image_transform
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image

from misp.negatives.embed import embed_images, embed_texts

# Float32 embeddings of the same images computed in different batches differ by ~1e-7 (the batch's
# composition changes the kernels' reduction order), so comparisons across builds need a tolerance.
# Unit-norm rows: 1e-5 absolute is ~100 ulps, far below any real change of an image (~1e-1).
EMBED_TOL = {"rtol": 1e-4, "atol": 1e-5}


@dataclass
class Bundle:
    """Duck-typed stand-in for misp.models.clip.ClipBundle."""

    model: Any
    preprocess: Any
    tokenizer: Any
    identity: str


class CountingCLIP(CLIP):
    """A real (tiny, random) open_clip CLIP that records how and how often it is called."""

    def __init__(self) -> None:
        super().__init__(
            embed_dim=8,
            vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=8, image_size=16),
            text_cfg=CLIPTextCfg(context_length=12, width=16, heads=2, layers=1),
        )
        self.image_calls = 0
        self.text_calls = 0
        self.seen: list[tuple[bool, bool]] = []  # (training, grad enabled) at each call

    def encode_image(self, image, normalize: bool = False):
        self.image_calls += 1
        self.seen.append((self.training, torch.is_grad_enabled()))
        return super().encode_image(image, normalize)

    def encode_text(self, text, normalize: bool = False):
        self.text_calls += 1
        self.seen.append((self.training, torch.is_grad_enabled()))
        return super().encode_text(text, normalize)


@pytest.fixture()
def bundle() -> Bundle:
    torch.manual_seed(0)
    return Bundle(
        CountingCLIP(), image_transform(16, is_train=False), SimpleTokenizer(context_length=12), "tiny-clip@0"
    )


def _write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(count):
        px = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        p = folder / f"img_{i}.png"
        Image.fromarray(px).save(p)
        paths.append(p)
    return paths


def _reference_images(bundle: Bundle, paths: list[Path]) -> torch.Tensor:
    with torch.no_grad():
        x = torch.stack([bundle.preprocess(Image.open(p).convert("RGB")) for p in paths])
        return F.normalize(CLIP.encode_image(bundle.model.eval(), x), dim=-1)


def test_image_embeddings_are_normalised_in_order_and_batch_independent(bundle, tmp_path):
    paths = _write_images(tmp_path, 5)
    bundle.model.train()
    a = embed_images(bundle, paths, batch_size=2, progress=False)
    assert bundle.model.training  # restored
    assert all(not training and not grad for training, grad in bundle.model.seen)
    assert a.dtype == torch.float32 and a.shape == (5, 8)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    b = embed_images(bundle, paths, batch_size=256, progress=False, num_workers=1)
    torch.testing.assert_close(a, b, **EMBED_TOL)
    torch.testing.assert_close(a, _reference_images(bundle, paths), **EMBED_TOL)
    rev = embed_images(bundle, paths[::-1], batch_size=3, progress=False)
    torch.testing.assert_close(rev, a.flip(0), **EMBED_TOL)


def test_image_cache_hits_and_rebuilds(bundle, tmp_path):
    paths = _write_images(tmp_path, 4)
    cache = tmp_path / "cache" / "pool_embeddings"
    first = embed_images(bundle, paths, batch_size=2, cache_path=cache, progress=False)
    assert bundle.model.image_calls == 2
    assert (tmp_path / "cache" / "pool_embeddings.safetensors").exists()

    def calls_for(ps, b=bundle) -> tuple[int, torch.Tensor]:
        before = b.model.image_calls
        out = embed_images(b, ps, batch_size=2, cache_path=cache, progress=False)
        return b.model.image_calls - before, out

    n, again = calls_for(paths)  # unchanged: loaded, model not called
    assert n == 0 and torch.equal(again, first)

    n, out = calls_for(paths[::-1])  # reordered
    assert n > 0
    torch.testing.assert_close(out, first.flip(0), **EMBED_TOL)
    n, out = calls_for(paths[:3])  # removed
    assert n > 0 and out.shape == (3, 8)
    (tmp_path / "more").mkdir()
    extra = _write_images(tmp_path / "more", 1, seed=1)[0]
    n, out = calls_for(paths + [extra])  # added
    assert n > 0 and out.shape == (5, 8)
    n, _ = calls_for(paths)
    assert n > 0  # back to the original list: the cache holds the last build, so it rebuilds once
    n, _ = calls_for(paths)
    assert n == 0

    # Changed content (new pixels, new size and mtime).
    Image.new("RGB", (31, 17), (10, 200, 30)).save(paths[1])
    n, out = calls_for(paths)
    assert n > 0 and (out[1] - first[1]).abs().max() > 1e-2
    torch.testing.assert_close(out[0], first[0], **EMBED_TOL)  # same image, another batch
    # Touched: same bytes, new modification time.
    st = os.stat(paths[2])
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    n, _ = calls_for(paths)
    assert n > 0

    # Another model identity with the same inputs rebuilds.
    other = Bundle(bundle.model, bundle.preprocess, bundle.tokenizer, "tiny-clip@1")
    n, _ = calls_for(paths, other)
    assert n > 0


def test_corrupt_image_cache_is_rebuilt(bundle, tmp_path):
    paths = _write_images(tmp_path, 3)
    cache = tmp_path / "emb.safetensors"
    first = embed_images(bundle, paths, cache_path=cache, progress=False)
    blob = bytearray(cache.read_bytes())
    blob[-1] ^= 0xFF
    cache.write_bytes(bytes(blob))
    before = bundle.model.image_calls
    again = embed_images(bundle, paths, cache_path=cache, progress=False)
    assert bundle.model.image_calls > before and torch.equal(again, first)


def test_text_embeddings_and_cache(bundle, tmp_path):
    texts = ["a small red circle", "a blue square at the top left", "two green triangles"]
    a = embed_texts(bundle, texts, batch_size=2, progress=False)
    with torch.no_grad():
        ref = F.normalize(CLIP.encode_text(bundle.model, bundle.tokenizer(texts)), dim=-1)
    torch.testing.assert_close(a, ref, **EMBED_TOL)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(3))

    cache = tmp_path / "texts"
    first = embed_texts(bundle, texts, cache_path=cache, progress=False)
    before = bundle.model.text_calls
    assert torch.equal(embed_texts(bundle, texts, cache_path=cache, progress=False), first)
    assert bundle.model.text_calls == before

    changed = texts[:2] + ["two green triangle"]
    out = embed_texts(bundle, changed, cache_path=cache, progress=False)
    assert bundle.model.text_calls > before and (out[2] - first[2]).abs().max() > 1e-2
    before = bundle.model.text_calls
    other = Bundle(bundle.model, bundle.preprocess, bundle.tokenizer, "another-clip")
    embed_texts(other, changed, cache_path=cache, progress=False)
    assert bundle.model.text_calls > before


def test_bad_inputs_raise(bundle, tmp_path):
    with pytest.raises(ValueError, match="no image"):
        embed_images(bundle, [], progress=False)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        embed_images(bundle, [tmp_path / "missing.png"], cache_path=tmp_path / "c", progress=False)
    with pytest.raises(TypeError):
        embed_texts(bundle, ["ok", 3], progress=False)
