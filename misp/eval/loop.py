"""Generation-based evaluation of a VLM: POPE and CHAIR over batches of images and prompts.

Used by every VLM LightningModule's validation and test steps, and usable on its own from a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from misp.eval.cooccurrence import CooccurrenceMetric
from misp.eval.metrics import CHAIRMetric, POPEMetric
from misp.models.generation import generate


@dataclass
class GenerationEval:
    """How answers are generated for evaluation (greedy, as POPE and CHAIR are reported)."""

    max_new_tokens: int = 48
    """Longest caption generated for CHAIR."""
    pope_max_new_tokens: int = 8
    """Longest answer generated for a POPE yes/no question."""
    pope_prompt_suffix: str = ""
    """Appended to each POPE question; LLaVA-1.5 uses " Answer the question using a single word or phrase."."""
    caption_prompt: str | None = None
    """Replaces the captions file's prompt (e.g. "Please describe this image in detail." for real CHAIR)."""


class Evaluator(nn.Module):
    """Holds the POPE and CHAIR metrics and fills them from generated answers.

    An ``nn.Module`` so the metrics follow the LightningModule's device and sync across ranks.
    """

    def __init__(
        self,
        config: GenerationEval,
        objects: list[str],
        synonyms: dict[str, str] | None = None,
        pairs: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.pope = POPEMetric()
        self.chair = CHAIRMetric(objects, synonyms) if objects else None
        self.cooccurrence = CooccurrenceMetric(pairs, objects, synonyms) if objects and pairs else None
        self.samples: list[dict] = []

    @torch.no_grad()
    def update(self, model, processor, batch: dict, keep_samples: int = 8) -> None:
        c = self.config
        if batch["task"] == "pope":
            prompts = [q + c.pope_prompt_suffix for q in batch["prompt"]]
            answers = [a[0] for a in generate(model, processor, batch["image"], prompts, max_new_tokens=c.pope_max_new_tokens)]
            self.pope.update(answers, batch["label"], batch["split"])
        elif batch["task"] == "caption":
            if self.chair is None:
                raise ValueError("captioning evaluation needs an object vocabulary for CHAIR (EvalData.objects)")
            prompts = [c.caption_prompt or p for p in batch["prompt"]]
            answers = [a[0] for a in generate(model, processor, batch["image"], prompts, max_new_tokens=c.max_new_tokens)]
            self.chair.update(answers, batch["objects"])
            if self.cooccurrence is not None:
                self.cooccurrence.update(answers, batch["objects"])
        else:
            raise ValueError(f"unknown evaluation task {batch['task']!r}")
        for i in range(min(len(answers), keep_samples - len(self.samples))):
            self.samples.append({"task": batch["task"], "id": batch["id"][i], "prompt": prompts[i], "answer": answers[i]})

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.pope.update_count:
            results.update(self.pope.compute())
        if self.chair is not None and self.chair.update_count:
            results.update(self.chair.compute())
        if self.cooccurrence is not None and self.cooccurrence.update_count:
            results.update(self.cooccurrence.compute())
        return results

    def reset(self) -> None:
        self.pope.reset()
        for metric in (self.chair, self.cooccurrence):
            if metric is not None:
                metric.reset()
        self.samples = []
