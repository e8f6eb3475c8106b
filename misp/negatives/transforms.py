"""Image-transform negatives: mDPO's random resized crop and CHiP/VCD-style forward-diffusion noise.

Pure functions of a PIL image and an explicit ``torch.Generator``: the same generator state gives the
same negative, so the datamodule can seed one draw per (seed, epoch, example) and use it for both the
policy and the reference pass (method.md section 1, decision on mDPO's crops).
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.functional as TF
from PIL import Image


def random_resized_crop(
    image: Image.Image,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.01, 0.2),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """mDPO's negative: a random crop keeping a fraction ``scale`` of the area, resized back.

    Draws the box exactly as ``torchvision.transforms.RandomResizedCrop.get_params`` does (ten tries of
    area fraction uniform in ``scale`` and log-uniform aspect ratio in ``ratio``, then the same central
    crop fallback), but from ``generator`` instead of the global RNG, and resizes the crop to the input
    size with bilinear antialiased interpolation. The kept fraction can differ from ``scale`` by the
    rounding of width and height to whole pixels, and on a very elongated image the fallback keeps more.

    Args:
        image: The positive image (any mode; the mode is kept).
        generator: Source of randomness.
        scale: Range of the kept fraction of the area.
        ratio: Range of the crop's width/height aspect ratio.

    Returns:
        The negative image, same size and mode as ``image``, and the crop box ``(left, top, width, height)``
        in input pixels.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
    width, height = image.size
    area = width * height
    # float32 log-ratios and tensor draws, as torchvision computes them, so boxes match it draw for draw.
    log_ratio = torch.log(torch.tensor(ratio))
    box = None
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            box = (left, top, w, h)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        box = ((width - w) // 2, (height - h) // 2, w, h)
    left, top, w, h = box
    out = TF.resized_crop(
        image, top, left, h, w, [height, width], TF.InterpolationMode.BILINEAR, antialias=True
    )
    return out, box


def sigmoid_betas(
    num_steps: int = 1000,
    beta_start: float = 1e-5,
    beta_end: float = 5e-3,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The sigmoid noise schedule of VCD/CHiP: ``sigmoid(linspace(-6, 6, T)) * (end - start) + start``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if not 0 <= beta_start <= beta_end < 1:
        raise ValueError(f"need 0 <= beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=dtype)) * (beta_end - beta_start) + beta_start


def alpha_bar(t: int, num_steps: int = 1000, beta_start: float = 1e-5, beta_end: float = 5e-3) -> float:
    """Cumulative signal fraction ``prod_{s=0..t} (1 - beta_s)`` of the sigmoid schedule.

    ``t`` is a 0-based step index, as in VCD's ``alphas_bar[t]``: t = 500 of 1000 includes 501 betas.
    Computed in float64.
    """
    if not 0 <= t < num_steps:
        raise ValueError(f"t must be in [0, {num_steps - 1}], got {t}")
    betas = sigmoid_betas(num_steps, beta_start, beta_end)
    return float(torch.prod(1 - betas[: t + 1]))


def forward_diffuse(
    x0: torch.Tensor,
    generator: torch.Generator,
    t: int = 500,
    num_steps: int = 1000,
    beta_start: float = 1e-5,
    beta_end: float = 5e-3,
) -> torch.Tensor:
    """A sample of ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``, unclamped.

    Args:
        x0: Clean data of any shape (float); the noise is drawn on CPU from ``generator``.
        generator: A CPU ``torch.Generator``.
        t, num_steps, beta_start, beta_end: The step and the sigmoid schedule (see :func:`alpha_bar`).
    """
    ab = alpha_bar(t, num_steps, beta_start, beta_end)
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    return math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps


def diffusion_noise(
    image: Image.Image,
    generator: torch.Generator,
    t: int = 500,
    num_steps: int = 1000,
    beta_start: float = 1e-5,
    beta_end: float = 5e-3,
) -> Image.Image:
    """CHiP-style visual negative: the image after ``t`` forward-diffusion steps.

    VCD, whose noising CHiP reuses, noises the model's normalised pixel tensor, which ties the negative
    to one image processor's mean and std. misp noises the pixels scaled to [-1, 1] (the convention of
    DDPM, where this schedule's signal-to-noise ratio means what it says), then maps back to [0, 255]
    with clamping and rounding, so the negative is an ordinary image any processor can take. With the
    defaults alpha_bar is about 0.745: the noise has std about 0.51 on the [-1, 1] scale.

    Args:
        image: The positive image (converted to RGB).
        generator: Source of the Gaussian noise (CPU).
        t: 0-based diffusion step (default 500 of 1000).
        num_steps: Length of the schedule.
        beta_start: First beta of the sigmoid schedule.
        beta_end: Last beta of the sigmoid schedule.

    Returns:
        An RGB image of the input's size.
    """
    x0 = TF.pil_to_tensor(image.convert("RGB")).to(torch.float32) / 127.5 - 1.0
    xt = forward_diffuse(x0, generator, t, num_steps, beta_start, beta_end)
    pixels = ((xt + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return TF.to_pil_image(pixels, mode="RGB")
