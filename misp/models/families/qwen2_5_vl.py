"""Qwen2.5-VL and Qwen3-VL (``Qwen/Qwen2.5-VL-3B-Instruct``, ``-7B-Instruct``, ``-32B``, ``-72B``): a windowed ViT with a
2x2 patch merger, dynamic resolution (each image's token count follows its size, bounded by the
processor's ``min_pixels`` / ``max_pixels``), and M-RoPE: 3-D positions the model computes from the
image grids, which misp therefore never passes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image
from torch import nn
from transformers import ProcessorMixin

from misp.batch import ImageInputs
from misp.models.families.base import ModelFamily, accepts, unwrapped
from misp.models.families.llava import rgb

VISION_NAME = "visual"


_unwrapped = unwrapped


def find_vision(model: nn.Module) -> nn.Module:
    """The vision transformer (with its merger) inside ``model``."""
    found = [m for name, m in model.named_modules() if name.split(".")[-1] == VISION_NAME and hasattr(m, "merger")]
    if len(found) != 1:
        raise ValueError(f"expected one '{VISION_NAME}' vision model in {type(model).__name__}, found {len(found)}")
    return found[0]


class Qwen25VLFamily(ModelFamily):
    """Qwen2.5-VL with its chat template (default system message), per-image token counts and M-RoPE."""

    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    processor_classes = ("Qwen2_5_VLProcessor",)
    examples = "Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct"
    unquantized_modules = ("visual", "lm_head")
    block_suffixes = ("DecoderLayer", "VisionBlock")
    response_separator = ""
    dynamic_resolution = True

    def prepare_images(self, processor: ProcessorMixin, images: Sequence[Image.Image]) -> ImageInputs:
        """``pixel_values [patches, C*T*P*P]`` (all images' patches, in order) and ``image_grid_thw [U, 3]``;
        image u takes ``t*h*w / merge^2`` tokens."""
        out = processor.image_processor(images=rgb(images), return_tensors="pt")
        grid = out["image_grid_thw"]
        merge = int(processor.image_processor.merge_size)
        return ImageInputs({"pixel_values": out["pixel_values"], "image_grid_thw": grid}, grid.prod(-1) // merge**2,
                           rows_per_image=grid.prod(-1))

    def image_tokens_for_size(self, processor: ProcessorMixin, width: int, height: int) -> int:
        """The image processor's own count (its ``smart_resize`` within ``min_pixels`` / ``max_pixels``, in
        patches) over the merger's ``merge^2``: what ``prepare_images`` gives the image."""
        ip = processor.image_processor
        return int(ip.get_number_of_image_patches(int(height), int(width), {})) // int(ip.merge_size) ** 2

    def forward_inputs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       images: ImageInputs, image_index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The patches, the grid of each row's image in row order (M-RoPE's positions come from it), and,
        in transformers releases that need it to compute M-RoPE, ``mm_token_type_ids`` (1 on image tokens).
        No ``position_ids``: explicit 1-D ones would silently replace M-RoPE."""
        grid = images.tensors["image_grid_thw"]
        kwargs = {
            "pixel_values": images.tensors["pixel_values"],
            "image_grid_thw": grid if image_index is None else grid.index_select(0, image_index.to(grid.device)),
        }
        if accepts(_unwrapped(model), "mm_token_type_ids"):
            image_id = _unwrapped(model).config.image_token_id
            kwargs["mm_token_type_ids"] = (input_ids == image_id).to(torch.int32)
        return kwargs

    def row_position_ids(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         images: ImageInputs, image_index: torch.Tensor | None) -> torch.Tensor:
        """The model's own M-RoPE positions ``[3, N, T]`` of the unpacked rows (``get_rope_index`` on the grid
        of each row's image), which the packed rows gather: a response's text positions continue from its
        prefix's largest position, as they do unpacked."""
        inner = _unwrapped(model)
        rope_index = getattr(inner, "get_rope_index", None) or inner.model.get_rope_index
        image_id = inner.config.image_token_id
        grid = images.tensors["image_grid_thw"]
        grid = grid if image_index is None else grid.index_select(0, image_index.to(grid.device))
        positions, _ = rope_index(input_ids, (input_ids == image_id).to(torch.int32), image_grid_thw=grid,
                                  attention_mask=attention_mask)
        return positions

    @contextmanager
    def shared_images(self, model: nn.Module, images: ImageInputs, image_index: torch.Tensor | None) -> Iterator[None]:
        """The forward is given one grid per row (for M-RoPE) and the U distinct images' patches: a pre-hook
        on the vision model hands it the U distinct grids, and a hook on it repeats the merged features of
        each image into the rows that use it, in row order, before the model splits them per row."""
        if image_index is None:
            yield
            return
        vision = find_vision(model)
        grid = images.tensors["image_grid_thw"]
        counts = images.tokens_per_image.tolist()

        def distinct_grid(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            kwargs = dict(kwargs)
            kwargs["grid_thw"] = grid.to(args[0].device if args else kwargs["hidden_states"].device)
            return args, kwargs

        def repeat_features(module: nn.Module, args: tuple, kwargs: dict, output):
            merged = output.pooler_output
            if merged.shape[0] != sum(counts):
                raise RuntimeError(
                    f"the vision model gave {merged.shape[0]} merged tokens, expected {sum(counts)} for the "
                    f"{len(counts)} distinct images"
                )
            rows = image_index.tolist()

            def repeat(features: torch.Tensor) -> torch.Tensor:
                per_image = torch.split(features, counts)
                return torch.cat([per_image[i] for i in rows])

            output.pooler_output = repeat(merged)
            if getattr(output, "deepstack_features", None) is not None:  # Qwen3-VL: intermediate layers' too
                output.deepstack_features = [repeat(f) for f in output.deepstack_features]
            return output

        handles = [vision.register_forward_pre_hook(distinct_grid, with_kwargs=True),
                   vision.register_forward_hook(repeat_features, with_kwargs=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


class Qwen3VLFamily(Qwen25VLFamily):
    """Qwen3-VL: Qwen2.5-VL's processing and M-RoPE inputs (interleaved M-RoPE, 16 px patches), plus DeepStack
    features of intermediate vision layers, repeated per row with the merged ones."""

    name = "qwen3-vl"
    model_types = ("qwen3_vl",)
    processor_classes = ("Qwen3VLProcessor",)
    examples = "Qwen/Qwen3-VL-2B-Instruct, Qwen/Qwen3-VL-4B-Instruct, Qwen/Qwen3-VL-8B-Instruct"
