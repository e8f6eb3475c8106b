"""misp.models.clip: the tiny open_clip CLIP, its save/load round trip (also through open_clip's own
local-dir loader), identities for cache keys, transforms and errors."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from misp.models import ClipSpec, TinyClipConfig, build_tiny_clip, load_clip, save_clip, train_transform
from misp.models.clip import CONFIG_FILE, WEIGHTS_FILE

SMALL = TinyClipConfig(image_size=32, patch_size=8, vision_width=64, text_width=64, context_length=16, embed_dim=32)
CAPTIONS = ["a small red circle at the top left.", "a large blue square at the center."]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(n)]


def _embed(bundle, images, texts):
    with torch.no_grad():
        pix = torch.stack([bundle.preprocess(im) for im in images])
        return bundle.model.encode_image(pix), bundle.model.encode_text(bundle.tokenizer(texts))


def test_tiny_clip_shapes_and_seeding():
    a = build_tiny_clip(SMALL)
    img, txt = _embed(a, _images(2), CAPTIONS)
    assert img.shape == txt.shape == (2, SMALL.embed_dim)
    assert a.tokenizer(CAPTIONS).shape == (2, SMALL.context_length) and a.tokenizer(CAPTIONS).dtype == torch.long
    assert a.preprocess(_images(1)[0]).shape == (3, SMALL.image_size, SMALL.image_size)
    b = build_tiny_clip(SMALL)
    c = build_tiny_clip(TinyClipConfig(**{**SMALL.__dict__, "seed": 1}))
    assert a.identity == b.identity != c.identity
    assert a.identity.startswith("sha256:")
    # Building does not move the caller's random state.
    state = torch.random.get_rng_state()
    build_tiny_clip(SMALL)
    assert torch.equal(state, torch.random.get_rng_state())


def test_save_load_round_trip_identical_embeddings_and_identity(tmp_path):
    bundle = build_tiny_clip(SMALL)
    with torch.no_grad():  # a "trained" model: the identity must follow the weights, not the build
        bundle.model.logit_scale.add_(0.5)
        bundle.model.visual.proj.mul_(1.1)
    stale = bundle.identity
    out = save_clip(bundle, tmp_path / "clip")
    assert bundle.identity != stale
    loaded = load_clip(ClipSpec(checkpoint=str(out)))
    assert loaded.identity == bundle.identity
    images = _images(3, seed=1)
    ref_img, ref_txt = _embed(bundle, images, CAPTIONS)
    got_img, got_txt = _embed(loaded, images, CAPTIONS)
    torch.testing.assert_close(got_img, ref_img, rtol=1e-5, atol=1e-6)  # another model object: float32 tolerance
    torch.testing.assert_close(got_txt, ref_txt, rtol=1e-5, atol=1e-6)
    assert loaded.model_cfg == SMALL.model_cfg()

    # open_clip's own loader reads the folder too.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        oc_img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        oc_txt = model.encode_text(tokenizer(CAPTIONS))
    torch.testing.assert_close(oc_img, ref_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(oc_txt, ref_txt, rtol=1e-5, atol=1e-6)


def test_changed_weights_are_detected(tmp_path):
    out = save_clip(build_tiny_clip(SMALL), tmp_path / "clip")
    state = load_file(str(out / WEIGHTS_FILE))
    state["logit_scale"] = state["logit_scale"] + 1.0
    save_file(state, str(out / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="identity"):
        load_clip(ClipSpec(checkpoint=str(out)))


def test_train_transform_matches_eval_geometry():
    bundle = build_tiny_clip(SMALL)
    img = _images(1)[0]
    torch.manual_seed(0)
    t = train_transform(bundle)(img)
    assert t.shape == (3, SMALL.image_size, SMALL.image_size)
    # Both end in the same normalisation: a flat grey image maps to the same constant either way.
    grey = Image.new("RGB", (48, 48), (128, 128, 128))
    torch.testing.assert_close(train_transform(bundle)(grey), bundle.preprocess(grey))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        ClipSpec()
    with pytest.raises(ValueError, match="exactly one"):
        ClipSpec(tiny=SMALL, checkpoint="x")
    with pytest.raises(ValueError, match="model_name"):
        ClipSpec(pretrained="openai")
    missing = tmp_path / "no-clip-here"
    with pytest.raises(FileNotFoundError, match="no-clip-here"):
        load_clip(ClipSpec(checkpoint=str(missing)))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CONFIG_FILE).write_text(json.dumps({"model_cfg": SMALL.model_cfg()}))
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_clip(ClipSpec(checkpoint=str(tmp_path / "half")))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TinyClipConfig(image_size=30, patch_size=8)
