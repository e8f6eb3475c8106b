from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from misp.negatives.transforms import alpha_bar, diffusion_noise, forward_diffuse, random_resized_crop


def _noise_image(size=(96, 72), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- random resized crop ------------------------------------------------------------------------------


def test_crop_keeps_1_to_20_percent_and_returns_original_size():
    image = _noise_image((320, 240))
    width, height = image.size
    area = width * height
    fractions = []
    for seed in range(300):
        out, (left, top, w, h) = random_resized_crop(image, _gen(seed))
        assert out.size == image.size and out.mode == image.mode
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        # w and h are the rounded sides of an area in [1%, 20%]; undo at most half a pixel of rounding.
        assert (w - 0.5) * (h - 0.5) <= 0.2 * area
        assert (w + 0.5) * (h + 0.5) >= 0.01 * area
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
        fractions.append(w * h / area)
    # On a 320x240 image rounding moves the fraction very little, and draws span the range.
    assert 0.0095 <= min(fractions) < 0.03 and 0.17 < max(fractions) <= 0.205


def test_crop_matches_torchvision_draw_for_draw():
    image = _noise_image((120, 90))
    tv = T.RandomResizedCrop((90, 120), scale=(0.01, 0.2), ratio=(3 / 4, 4 / 3))
    for seed in range(20):
        torch.manual_seed(seed)
        expected = tv(image)
        out, _ = random_resized_crop(image, _gen(seed))
        assert np.array_equal(np.asarray(out), np.asarray(expected)), seed


def test_crop_fallback_on_elongated_image_is_torchvision_central_crop():
    image = _noise_image((1000, 4))
    out, box = random_resized_crop(image, _gen(0))
    # No 1-20% crop with aspect in [3/4, 4/3] fits a 4-pixel-high strip; fall back to a 5x4 centre crop.
    assert box == (497, 0, 5, 4)
    torch.manual_seed(0)
    top, left, h, w = T.RandomResizedCrop.get_params(image, [0.01, 0.2], [3 / 4, 4 / 3])
    assert box == (left, top, w, h)
    assert out.size == (1000, 4)


def test_crop_is_deterministic_in_the_generator():
    image = _noise_image()
    a, box_a = random_resized_crop(image, _gen(7))
    b, box_b = random_resized_crop(image, _gen(7))
    c, box_c = random_resized_crop(image, _gen(8))
    assert box_a == box_b and np.array_equal(np.asarray(a), np.asarray(b))
    assert box_a != box_c
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(image, _gen(0), scale=(0.3, 0.2))


# --- diffusion noise ----------------------------------------------------------------------------------


def test_alpha_bar_matches_numpy_recomputation():
    betas = 1 / (1 + np.exp(-np.linspace(-6, 6, 1000))) * (5e-3 - 1e-5) + 1e-5
    cum = np.cumprod(1 - betas)
    assert alpha_bar(500) == pytest.approx(cum[500], rel=1e-12)
    assert alpha_bar(500) == pytest.approx(0.7448, abs=1e-4)
    assert alpha_bar(0) == pytest.approx(1 - 1e-5 - (5e-3 - 1e-5) / (1 + math.exp(6)), rel=1e-12)
    assert alpha_bar(999) == pytest.approx(cum[999], rel=1e-12)
    with pytest.raises(ValueError):
        alpha_bar(1000)


def test_forward_diffuse_moments_on_a_constant_image():
    x0 = torch.full((3, 200, 200), 0.3)
    xt = forward_diffuse(x0, _gen(0), t=500)
    ab = alpha_bar(500)
    n = xt.numel()
    # Sample mean within 5 standard errors of sqrt(ab) x0; variance within 5 standard errors of 1 - ab.
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.3, abs=5 * math.sqrt((1 - ab) / n))
    assert xt.var().item() == pytest.approx(1 - ab, abs=5 * (1 - ab) * math.sqrt(2 / n))


def test_diffusion_noise_is_the_clamped_quantised_closed_form():
    image = _noise_image((48, 40), seed=3)
    out = diffusion_noise(image, _gen(11))
    assert out.size == image.size and out.mode == "RGB"
    x0 = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    ab = alpha_bar(500)
    eps = torch.randn(x0.shape, generator=_gen(11))
    expected = ((math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps + 1) * 127.5).round().clamp(0, 255)
    assert np.array_equal(np.asarray(out), expected.permute(1, 2, 0).numpy().astype(np.uint8))


def test_diffusion_noise_pixel_statistics_on_mid_grey():
    # x0 = 0 on the [-1, 1] scale (pixel 127.5 is not representable: use 127 and account for it).
    image = Image.new("RGB", (128, 128), (127, 127, 127))
    out = np.asarray(diffusion_noise(image, _gen(5))).astype(np.float64) / 127.5 - 1
    ab = alpha_bar(500)
    mu = math.sqrt(ab) * (127 / 127.5 - 1)
    sd = math.sqrt(1 - ab)
    # Clamping to [-1, 1] cuts ~5% of the mass, so compare with the clamped normal's moments.
    z = np.random.default_rng(0).normal(mu, sd, 2_000_000).clip(-1, 1)
    assert out.mean() == pytest.approx(z.mean(), abs=0.01)
    assert out.std() == pytest.approx(z.std(), abs=0.01)


def test_diffusion_noise_is_deterministic_in_the_generator():
    image = _noise_image()
    a = np.asarray(diffusion_noise(image, _gen(3)))
    b = np.asarray(diffusion_noise(image, _gen(3)))
    c = np.asarray(diffusion_noise(image, _gen(4)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # t = 0 adds almost no noise: sqrt(1 - alpha_bar(0)) ~ 0.0047 on [-1, 1], 0.6 of a pixel level, so
    # even the largest of ~20k deviations (about 4.5 sd, plus rounding) stays within 4 levels.
    quiet = np.asarray(diffusion_noise(image, _gen(3), t=0)).astype(int)
    diff = np.abs(quiet - np.asarray(image).astype(int))
    assert diff.max() <= 4 and diff.mean() < 1
