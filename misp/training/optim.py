"""The optimiser recipe shared by misp's modules: AdamW with linear warm-up and cosine decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def adamw_with_warmup_cosine(
    params: Iterable[torch.nn.Parameter] | Iterable[dict],
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.1,
) -> dict:
    """A Lightning ``configure_optimizers`` answer: AdamW stepped per batch with warm-up then cosine.

    ``total_steps`` comes from ``trainer.estimated_stepping_batches`` so the schedule follows whatever
    epochs, batch size or gradient accumulation the config sets.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
