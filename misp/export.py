"""``misp export``: a trained checkpoint as a peft adapter or a merged model folder, with a model card.

    misp export --ckpt_path runs/misp/checkpoints/last.ckpt --out exports/misp-lora
    misp export --ckpt_path runs/misp/checkpoints/last.ckpt --out exports/misp-merged --merge \\
        --push_to_hub me/llava-1.5-7b-misp-dpo

The checkpoint holds the trainable weights and the run's settings; the frozen base is loaded again from
the path the run trained on (unquantised, so that a QLoRA run merges into full-precision weights). The
adapter folder is peft's layout (``PeftModel.from_pretrained(base, folder)`` or
``misp eval --model <base> --adapter <folder>``); the merged folder is the Hugging Face layout that
transformers, vLLM, lmms-eval and VLMEvalKit load. Both hold the processor and a ``README.md`` model
card naming the method, beta, K, negative source, data, base model and misp version.
``--ckpt_path`` also takes a folder a run exported at the end of fit (``export_dir``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from torch import nn
from transformers import ProcessorMixin

import misp
from misp.checkpoints import read_checkpoint
from misp.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def _spec_from_hparams(vlm: Mapping[str, Any]):
    """The run's ``VLMSpec`` from its checkpoint's plain hyperparameters, set up to load for export."""
    from misp.models.tiny_llava import TinyLlavaConfig
    from misp.models.vlm import LoraSpec, VLMSpec

    known = {f.name for f in fields(VLMSpec)}
    args = {k: v for k, v in dict(vlm).items() if k in known}
    if isinstance(args.get("lora"), Mapping):
        args["lora"] = LoraSpec(**args["lora"])
    if isinstance(args.get("tiny"), Mapping):
        args["tiny"] = TinyLlavaConfig(**args["tiny"])
    spec = VLMSpec(**args)
    # The base in full precision (a QLoRA run's adapter merges into real weights), on one device, no
    # training machinery.
    return replace(spec, load_in_4bit=False, bnb_4bit_quant_storage=None, gradient_checkpointing=False,
                   device_map=None, adapter=None)


def load_checkpoint_model(ckpt_path: str | Path) -> tuple[nn.Module, ProcessorMixin, dict]:
    """The VLM of a training checkpoint (or of an exported folder), its processor, and the run's settings.

    Returns:
        ``(model, processor, info)``; ``info`` holds ``hyper_parameters`` and ``datamodule_hyper_parameters``
        of the checkpoint (empty for a folder) and ``base`` (the base model's path).
    """
    import torch

    from misp.models.vlm import VLMSpec, load_vlm

    path = Path(ckpt_path)
    if path.is_dir() and (path / "config.json").is_file():
        model, processor = load_vlm(VLMSpec(path=str(path)))
        base = getattr(getattr(model, "peft_config", {}).get("default", None), "base_model_name_or_path", None)
        return model, processor, {"hyper_parameters": {}, "datamodule_hyper_parameters": {}, "base": base or str(path)}
    ckpt = read_checkpoint(path)
    hp = dict(ckpt.get("hyper_parameters") or {})
    if not isinstance(hp.get("vlm"), Mapping):
        raise CheckpointError(f"checkpoint {path}: its hyper_parameters hold no 'vlm' settings; it was not written "
                              "by a misp VLM module (SFT or preference stage)")
    spec = _spec_from_hparams(hp["vlm"])
    model, processor = load_vlm(spec)
    state = {k.removeprefix("model."): v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("model.")}
    if not state:
        raise CheckpointError(f"checkpoint {path}: holds no model weights (state_dict keys 'model.*')")
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise CheckpointError(f"checkpoint {path}: {len(unknown)} weights this model lacks (e.g. {unknown[:3]}); "
                              "its base or LoRA settings differ from the run's")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {path}: lacks {len(missing)} trainable weights (e.g. {missing[:3]})")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    model.eval()
    return model, processor, {"hyper_parameters": hp,
                              "datamodule_hyper_parameters": dict(ckpt.get("datamodule_hyper_parameters") or {}),
                              "base": spec.path or "the tiny Shapes LLaVA"}


def model_card(info: Mapping[str, Any], merged: bool) -> str:
    """A ``README.md`` with the hub's metadata header and the run's method, data and base model."""
    hp, data = info.get("hyper_parameters", {}), info.get("datamodule_hyper_parameters", {})
    method = hp.get("method") or {}
    method = method if isinstance(method, Mapping) else {}
    terms = [t.get("class_path", str(t)).rsplit(".", 1)[-1] if isinstance(t, Mapping) else str(t)
             for t in (method.get("terms") or {}).values() if t is not None]
    negatives = method.get("negatives") or {}
    rows = {
        "method": " + ".join(terms) or ("SFT" if not hp.get("method") else "?"),
        "beta": method.get("beta", "-"),
        "K (negatives per record)": negatives.get("k", "-"),
        "negative source": negatives.get("source", "-"),
        "data": data.get("records_file") or data.get("train_file") or "-",
        "base model": info.get("base", "-"),
        "misp version": misp.__version__,
        "form": "merged weights" if merged else "LoRA adapter (peft)",
    }
    base = info.get("base") or ""
    header = ["---", f"base_model: {base}" if base and "/" in str(base) and not Path(str(base)).exists() else None,
              f"library_name: {'transformers' if merged else 'peft'}", "pipeline_tag: image-text-to-text",
              "tags:", "- misp", "- dpo", "- vision-language", "---"]
    lines = [h for h in header if h is not None]
    lines += ["", "# A misp-trained vision-language model", "",
              "Trained with [misp](https://github.com/) multimodal preference optimisation.", "",
              "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    usage = ("LlavaForConditionalGeneration.from_pretrained(\"<this folder>\")" if merged else
             "PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(\"<base model>\"), \"<this folder>\")")
    lines += ["", "Load:", "", "```python", usage, "```", ""]
    return "\n".join(lines)


def export(ckpt_path: str | Path, out: str | Path, merge: bool = False) -> Path:
    """Write the checkpoint's model to ``out``: the adapter (peft layout) or, with ``merge``, a merged model
    folder; the processor and a model card beside it."""
    from misp.models.vlm import save_vlm, unwrap_peft

    model, processor, info = load_checkpoint_model(ckpt_path)
    out = Path(out)
    is_peft = unwrap_peft(model) is not model
    if merge or not is_peft:
        if not merge:
            log.warning("the checkpoint's model has no LoRA adapter (a full fine-tune): writing the whole model")
        save_vlm(model, processor, out, merge_lora=True)
        merged = True
    else:
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        merged = False
    (out / "README.md").write_text(model_card(info, merged), encoding="utf-8")
    return out


def push_to_hub(folder: str | Path, repo_id: str, private: bool = True, api=None) -> str:
    """Upload ``folder`` to the hub repository ``repo_id`` (created if needed) with ``huggingface_hub``.

    Args:
        folder: The exported folder.
        repo_id: ``user/name`` on the hub.
        private: Create the repository private.
        api: A ``huggingface_hub.HfApi`` (its endpoint and token); None makes the default one (HF_TOKEN,
            HF_ENDPOINT).

    Returns:
        The URL of the upload's commit.
    """
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message=f"misp export ({misp.__version__})")
    return str(getattr(info, "commit_url", info))


def export_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="misp export", description="A checkpoint as a LoRA adapter or merged model folder.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="A run's checkpoint (.ckpt) or exported folder.")
    parser.add_argument("--out", type=str, required=True, help="Output folder (created; files in it are replaced).")
    parser.add_argument("--merge", type=bool, default=False, help="Fold LoRA into the weights: one plain model folder.")
    parser.add_argument("--push_to_hub", type=str | None, default=None, help="Also upload to this hub repo (user/name).")
    parser.add_argument("--private", type=bool, default=True, help="Create the hub repository private.")
    return parser


def run_export(argv: Sequence[str]) -> Path:
    """``misp export``'s body."""
    cfg = export_parser().parse_args(list(argv))
    if Path(cfg.out).resolve() == Path(cfg.ckpt_path).resolve():
        raise ConfigError("--out must differ from --ckpt_path")
    out = export(cfg.ckpt_path, cfg.out, merge=cfg.merge)
    print(f"wrote the {'merged model' if cfg.merge else 'adapter'} to {out}")
    if cfg.push_to_hub:
        print(f"pushed to {push_to_hub(out, cfg.push_to_hub, private=cfg.private)}")
    return out
