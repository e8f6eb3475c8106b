"""Supervised fine-tuning of a VLM on (image, prompt, response) examples: the Shapes base model."""

from __future__ import annotations

import torch

from misp.eval.loop import GenerationEval
from misp.hparams import save_plain_hyperparameters
from misp.models.forward import response_logits
from misp.models.vlm import VLMSpec
from misp.training.vlm_module import VLMModule


class SFTModule(VLMModule):
    """Next-token cross-entropy on response tokens only (prompt and image tokens carry label -100).

    Args:
        vlm: the VLM to fine-tune (the tiny Shapes LLaVA built from the world's vocabulary by default).
        generation: how evaluation answers are generated.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before cosine decay.
        export_dir: where the fine-tuned model is saved at the end of fit (the DPO stages start from it).
    """

    def __init__(
        self,
        vlm: VLMSpec,
        generation: GenerationEval | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 50,
        export_dir: str | None = None,
    ) -> None:
        super().__init__(vlm, generation, lr, weight_decay, warmup_steps, export_dir)
        save_plain_hyperparameters(self)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Logits only from the first response position on: the image and prompt logits carry no loss.
        logits, labels = response_logits(
            self.model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]
        )
        # Shifted token-level mean: every supervised token weighs the same, whatever its sequence.
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss
