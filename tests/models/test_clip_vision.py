"""The tiny LLaVA's vision tower initialised from a saved open_clip CLIP computes what that CLIP computes."""

from __future__ import annotations

import json

import torch

from misp.models.clip import ClipSpec, TinyClipConfig, build_tiny_clip, load_clip, save_clip
from misp.models.tiny_llava import TinyLlavaConfig, build_tiny_llava


def test_llava_vision_tower_from_clip_matches_open_clip(tiny_world, tmp_path):
    torch.manual_seed(0)
    bundle = build_tiny_clip(TinyClipConfig(image_size=32, vision_width=64, vision_layers=3, text_width=32))
    # Perturb every weight so a wrong mapping (e.g. swapped q/k) cannot pass by symmetry of the init.
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_clip(bundle, tmp_path / "clip")
    clip = load_clip(ClipSpec(checkpoint=str(tmp_path / "clip"))).model.visual.eval()
    words = json.loads((tiny_world / "world.json").read_text())["vocabulary"]
    model, _ = build_tiny_llava(words, TinyLlavaConfig(vision_init=str(tmp_path / "clip")))
    tower = model.model.vision_tower.eval()
    assert model.config.vision_config.num_hidden_layers == 3 and model.config.vision_config.hidden_size == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = clip(x)  # ln_post(CLS) @ proj
        out = tower(pixel_values=x, output_hidden_states=True)
        got = out.pooler_output @ clip.proj
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
