"""Evaluation of a VLM over batches of images and prompts: POPE, CHAIR, co-occurrence and Shapes-MMVP
from generated answers, and likelihood grounding and the partner-token probe from scored captions.

Used by every VLM LightningModule's validation and test steps, and usable on its own from a notebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from misp.eval.cooccurrence import CooccurrenceMetric
from misp.eval.grounding import LikelihoodGroundingMetric, MMVPMetric
from misp.eval.metrics import CHAIRMetric, POPEMetric
from misp.eval.parsing import parse_yes_no
from misp.eval.partner_probe import PartnerLogpGapMetric
from misp.eval.scoring import response_logps_per_image
from misp.models.generation import generate


@dataclass
class GenerationEval:
    """How answers are generated for evaluation (greedy, as POPE and CHAIR are reported)."""

    max_new_tokens: int = 48
    """Longest caption generated for CHAIR."""
    pope_max_new_tokens: int = 8
    """Longest answer generated for a POPE or Shapes-MMVP yes/no question."""
    pope_prompt_suffix: str = ""
    """Appended to each POPE and Shapes-MMVP question; LLaVA-1.5 uses " Answer the question using a single
    word or phrase."."""
    caption_prompt: str | None = None
    """Replaces the captions file's prompt (e.g. "Please describe this image in detail." for real CHAIR)."""
    score_rows: int = 16
    """Most (caption, image) rows per forward when scoring captions for likelihood grounding; a caption
    and its counterfactuals always share one forward, so each image is encoded once."""


class Evaluator(nn.Module):
    """Holds the evaluation metrics and fills them: POPE, CHAIR, co-occurrence and Shapes-MMVP from
    generated answers, likelihood grounding from the summed log-probabilities of captions.

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
        self.mmvp = MMVPMetric()
        self.grounding = LikelihoodGroundingMetric()
        self.partner_gap = PartnerLogpGapMetric()
        self.samples: list[dict] = []
        # Every answer with what it was scored on: ``misp test`` writes them to generations/<task>.jsonl.
        self.generations: list[dict] = []

    @torch.no_grad()
    def update(self, model, processor, batch: dict, keep_samples: int = 8) -> None:
        c = self.config
        if batch["task"] == "pope":
            prompts = [q + c.pope_prompt_suffix for q in batch["prompt"]]
            answers = [a[0] for a in generate(model, processor, batch["image"], prompts, max_new_tokens=c.pope_max_new_tokens)]
            self.pope.update(answers, batch["label"], batch["split"])
            judgements = [{"split": s, "truth": t, "pred": parse_yes_no(a)}
                          for a, t, s in zip(answers, batch["label"], batch["split"], strict=True)]
        elif batch["task"] == "partner_caption":
            # A world's partner scenes: captions for partner_present_rate only (see misp.eval.partner_probe).
            if self.cooccurrence is None:
                return  # co-occurrence turned off (no pairs): nothing would read these captions
            prompts = [c.caption_prompt or p for p in batch["prompt"]]
            answers = [a[0] for a in generate(model, processor, batch["image"], prompts, max_new_tokens=c.max_new_tokens)]
            self.cooccurrence.update(answers, batch["objects"], present_only=True)
            judgements = [{"objects": list(gt)} for gt in batch["objects"]]
        elif batch["task"] == "caption":
            if self.chair is None:
                raise ValueError("captioning evaluation needs an object vocabulary for CHAIR (EvalData.objects)")
            prompts = [c.caption_prompt or p for p in batch["prompt"]]
            answers = [a[0] for a in generate(model, processor, batch["image"], prompts, max_new_tokens=c.max_new_tokens)]
            self.chair.update(answers, batch["objects"])
            judgements = [{"objects": list(gt), "mentions": self.chair.extractor(a)}
                          for a, gt in zip(answers, batch["objects"], strict=True)]
            if self.cooccurrence is not None:
                self.cooccurrence.update(answers, batch["objects"])
        elif batch["task"] == "mmvp":
            # Both images of every pair in one generate call: the same question, image a then image b.
            n = len(batch["prompt"])
            prompts = [q + c.pope_prompt_suffix for q in batch["prompt"]]
            both = generate(
                model, processor, list(batch["image"]) + list(batch["image_b"]), prompts + prompts,
                max_new_tokens=c.pope_max_new_tokens,
            )
            answers = [f"{a[0]} | {b[0]}" for a, b in zip(both[:n], both[n:], strict=True)]
            judgements = [
                {"truth_a": ta, "truth_b": tb, "pred_a": parse_yes_no(a[0]), "pred_b": parse_yes_no(b[0]),
                 "attribute": attr}
                for a, b, ta, tb, attr in zip(both[:n], both[n:], batch["answer_a"], batch["answer_b"],
                                              batch["attribute"], strict=True)
            ]
            self.mmvp.update(
                [a[0] for a in both[:n]], [b[0] for b in both[n:]], batch["answer_a"], batch["answer_b"],
                batch["attribute"],
            )
        elif batch["task"] == "likelihood":
            self._score_captions(model, processor, batch)
            return  # scores, not answers: nothing to keep as a sample
        elif batch["task"] == "partner_logp":
            # Each case twice: its partner's sentence, then its partner's name alone (misp.eval.partner_probe).
            items = [(p, cap, [a, b]) for p, cap, a, b in
                     zip(batch["prompt"], batch["caption"], batch["image"], batch["image_b"], strict=True)]
            scores = torch.stack(response_logps_per_image(model, processor, items + items, max_rows=self.config.score_rows,
                                                          spans=list(batch["span"]) + list(batch["name_span"])))
            n = len(items)
            self.partner_gap.update(scores[:n, 0], scores[:n, 1], scores[n:, 0], scores[n:, 1])
            return
        else:
            raise ValueError(f"unknown evaluation task {batch['task']!r}")
        self.generations.extend(
            {"task": batch["task"], "id": batch["id"][i], "prompt": prompts[i], "answer": answers[i],
             "judgement": judgements[i]}
            for i in range(len(answers))
        )
        for i in range(min(len(answers), keep_samples - len(self.samples))):
            self.samples.append({"task": batch["task"], "id": batch["id"][i], "prompt": prompts[i], "answer": answers[i]})

    def _score_captions(self, model, processor, batch: dict) -> None:
        """Likelihood grounding: each caption under its own image and under each counterfactual."""
        items = [
            (prompt, caption, [image, *cfs])
            for prompt, caption, image, cfs in zip(
                batch["prompt"], batch["caption"], batch["image"], batch["counterfactuals"], strict=True
            )
        ]
        scores = response_logps_per_image(model, processor, items, max_rows=self.config.score_rows)
        own = torch.stack([s[0] for s in scores])
        counterfactual = torch.cat([s[1:] for s in scores])
        caption = torch.cat([torch.full((len(s) - 1,), i, dtype=torch.long) for i, s in enumerate(scores)])
        attributes = [a for attrs in batch["attributes"] for a in attrs]
        self.grounding.update(own, counterfactual, caption, attributes)

    def compute(self) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.pope.update_count:
            results.update(self.pope.compute())
        if self.chair is not None and self.chair.update_count:
            results.update(self.chair.compute())
        if self.cooccurrence is not None and self.cooccurrence.update_count:
            results.update(self.cooccurrence.compute())
        for metric in (self.mmvp, self.grounding, self.partner_gap):
            if metric.update_count:
                results.update(metric.compute())
        return results

    def reset(self) -> None:
        for metric in (self.pope, self.mmvp, self.grounding, self.partner_gap):
            metric.reset()
        for metric in (self.chair, self.cooccurrence):
            if metric is not None:
                metric.reset()
        self.samples = []
        self.generations = []
