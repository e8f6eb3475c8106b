"""The registry of supported VLM families (``misp.models.families.base.ModelFamily``).

A model folder or hub id is matched to its family from ``config.json`` alone, before any weight loads; a
folder of no registered family (or of a near relative, as LLaVA-NeXT is to LLaVA-1.5) is refused in one
line naming the supported families. A loaded model and a processor are matched by their config and class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn
from transformers import ProcessorMixin

from misp.errors import UserError
from misp.models.families.base import LANGUAGE_MODEL_PROJECTIONS, ModelFamily, bare_question
from misp.models.families.gemma3 import Gemma3Family
from misp.models.families.llava import Llava15Family
from misp.models.families.qwen2_5_vl import Qwen3VLFamily, Qwen25VLFamily

FAMILIES: dict[str, ModelFamily] = {}
"""Registered families by name, in registration order."""


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry (its ``model_types`` must not be claimed by another)."""
    for other in FAMILIES.values():
        shared = set(other.model_types) & set(family.model_types)
        if shared and other.name != family.name:
            raise ValueError(f"model_type {sorted(shared)} is already the {other.name} family's")
    FAMILIES[family.name] = family
    return family


for _family in (Llava15Family(), Qwen25VLFamily(), Qwen3VLFamily(), Gemma3Family()):
    register_family(_family)


def supported() -> str:
    """One line naming the supported families and their checkpoints."""
    return "; ".join(f"{f.name} ({', '.join(f.model_types)}: e.g. {f.examples})" for f in FAMILIES.values())


class UnsupportedModelError(UserError, ValueError):
    """A model folder or hub id of no supported family."""


def family_for_config(config, where: str = "the model") -> ModelFamily:
    """The family of a transformers config or ``config.json`` dict; refuses an unknown one in one line."""
    for family in FAMILIES.values():
        if family.matches_config(config):
            return family
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    raise UnsupportedModelError(
        f"{where}: model_type {model_type!r} is not a supported VLM family; supported: {supported()}"
    )


def read_config_json(path: str, **hub_kwargs) -> dict:
    """``config.json`` of a local folder, or of a hub id from the hub cache (or the hub when online)."""
    folder = Path(os.path.expanduser(path))
    if folder.is_dir():
        file = folder / "config.json"
        if not file.is_file():
            raise UnsupportedModelError(f"{folder}: no config.json, so not a transformers model folder; supported: {supported()}")
    else:
        from huggingface_hub import hf_hub_download

        file = Path(hf_hub_download(path, "config.json", **hub_kwargs))
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{file}:{e.lineno}: config.json is not valid JSON: {e.msg}") from None


def family_for_path(path: str, **hub_kwargs) -> ModelFamily:
    """The family of the checkpoint at ``path`` (folder or hub id), from its ``config.json`` only."""
    return family_for_config(read_config_json(path, **hub_kwargs), where=str(path))


def family_for_processor(processor: ProcessorMixin) -> ModelFamily:
    """The family whose processor ``processor`` is."""
    name = type(processor).__name__
    for family in FAMILIES.values():
        if name in family.processor_classes:
            return family
    raise UnsupportedModelError(f"processor {name} belongs to no supported VLM family; supported: {supported()}")


def takes_any_image_size(processor) -> bool:
    """Whether ``processor`` is of a dynamic-resolution family (its images differ in token count); False
    for fixed-size processors, including stand-ins of no registered family (test doubles)."""
    name = type(processor).__name__
    return any(f.dynamic_resolution and name in f.processor_classes for f in FAMILIES.values())


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a loaded model (plain, peft-wrapped, quantised or FSDP-wrapped)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "model_type")), None)
    if config is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformers config; supported: {supported()}")
    return family_for_config(config, where=type(model).__name__)


__all__ = [
    "FAMILIES",
    "Gemma3Family",
    "LANGUAGE_MODEL_PROJECTIONS",
    "Llava15Family",
    "ModelFamily",
    "Qwen3VLFamily",
    "Qwen25VLFamily",
    "UnsupportedModelError",
    "bare_question",
    "family_for_config",
    "family_for_path",
    "family_for_processor",
    "family_of",
    "register_family",
    "supported",
    "takes_any_image_size",
]
