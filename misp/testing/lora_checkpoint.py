"""A LoRA checkpoint in the layout a misp preference run writes, made without training: for ``misp export``
tests and the lmms-eval hand-off example (examples/lmms_eval_handoff.sh)."""

from __future__ import annotations

import os

import torch

from misp.hparams import plain
from misp.models.vlm import LoraSpec, VLMSpec, load_vlm


def write_lora_checkpoint(base: str | os.PathLike, path: str | os.PathLike, seed: int = 0) -> torch.nn.Module:
    """Write to ``path`` a checkpoint of a LoRA (r 4, alpha 8) on the model folder ``base`` as a misp DPO run
    writes it: the trainable weights under ``model.``, the run's VLM spec and method (TextDPO, beta 0.1)
    (K 4, negatives from the SAE) and its data settings.

    The LoRA B matrices, zero at initialisation, are drawn from N(0, 0.5^2) with ``seed``, so that the
    adapter visibly changes the model, as training does.

    Returns:
        The live model with the adapter, in eval mode.
    """
    spec = VLMSpec(path=str(base), lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    model, _ = load_vlm(spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    state = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({
        "pytorch-lightning_version": "2.5.0",
        "state_dict": state,
        "hyper_parameters": {"vlm": plain(spec), "method": {"beta": 0.1, "terms": {
            "text": {"class_path": "misp.dpo.terms.TextDPO", "init_args": {"weight": 1.0}}},
            "negatives": {"source": "sae", "k": 4}}},
        "datamodule_hyper_parameters": {"records_file": "data/prefs.jsonl"},
    }, path)
    return model.eval()
