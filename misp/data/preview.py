"""What the model is contrasted against, shown every epoch: statistics and a preview of a few records.

W&B gets a table (prompt, positive, each negative with its q and SAE score); TensorBoard an image grid;
any other logger a PNG grid saved under ``<log_dir>/negatives/`` (path logged).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from misp.images import load_rgb

log = logging.getLogger(__name__)


def draw_ess(log_q: torch.Tensor) -> torch.Tensor:
    """Per record, the ESS of the draws' importance weights 1/q against the uniform target (K when q is uniform)."""
    log_w = -log_q.double()
    return (2 * torch.logsumexp(log_w, 1) - torch.logsumexp(2 * log_w, 1)).exp()


def negatives_statistics(datamodule, draws) -> dict[str, float]:
    stats = {"negatives/k": float(draws.log_q.shape[1])}
    if datamodule.pool_paths:
        stats["negatives/pool_size"] = float(len(datamodule.pool_paths))
    sel = datamodule.selection
    if sel is not None:
        valid = sel.valid
        stats["negatives/mean_score"] = float(sel.scores[valid].mean())
        later = valid.clone()
        later[:, 0] = False  # the first pick's gain is 1 by convention, not a measured distance
        if bool(later.any()):
            stats["negatives/diversity"] = float(sel.gains[later].mean())
        if datamodule.candidates.own is not None:
            # The mixed pool (mining.record_candidates): how much of the selection the records' own images take.
            stats["negatives/selected_own"] = float(datamodule.candidates.is_own(sel.pool_index)[valid].float().mean())
    if bool((draws.log_q != 0).any()):
        stats["negatives/draw_ess"] = float(draw_ess(draws.log_q).mean())
    return stats


def _grid(rows: list[list[Image.Image]], captions: list[list[str]], cell: int = 96) -> Image.Image:
    width = max(len(r) for r in rows)
    grid = Image.new("RGB", (width * cell, len(rows) * (cell + 14)), "white")
    pen = ImageDraw.Draw(grid)
    for i, (row, texts) in enumerate(zip(rows, captions, strict=True)):
        for j, (img, text) in enumerate(zip(row, texts, strict=True)):
            grid.paste(img.convert("RGB").resize((cell, cell)), (j * cell, i * (cell + 14)))
            pen.text((j * cell + 2, i * (cell + 14) + cell), text[:16], fill="black")
    return grid


def _image(ref: Image.Image | str | Path) -> Image.Image:
    return ref if isinstance(ref, Image.Image) else load_rgb(ref)


def log_negatives_preview(trainer, datamodule, dataset, draws, epoch: int, n: int) -> None:
    """Log statistics of this epoch's draws and a preview of the first ``n`` records."""
    stats = negatives_statistics(datamodule, draws)
    for logger in trainer.loggers:
        logger.log_metrics(stats, step=trainer.global_step)
    sel = datamodule.selection
    rows, captions, table = [], [], []
    for i in range(min(n, len(dataset))):
        item = dataset[i]
        i = dataset.kept[i]  # the record's position in the file: draws and selection are indexed by it
        q = draws.log_q[i].exp().tolist()
        scores = [float(sel.scores[i, j]) if sel is not None else math.nan for j in draws.draw_index[i].tolist()]
        # The epoch's items name image files by path (decoded only on a pixel-cache miss); show the images.
        positive, negatives = _image(item["positive"]), [_image(x) for x in item["negatives"]]
        rows.append([positive, *negatives])
        captions.append(["positive"] + [f"q={qi:.2f} s={si:.2f}" for qi, si in zip(q, scores, strict=True)])
        table.append((item["id"], datamodule.records[i].prompt, positive, negatives, q, scores))
    if not rows:
        return
    grid = _grid(rows, captions)
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            import wandb

            columns = ["id", "prompt", "positive"] + [f"negative_{j}" for j in range(len(table[0][3]))]
            data = [
                [rid, prompt, wandb.Image(pos)]
                + [wandb.Image(img, caption=f"q={qj:.3f} score={sj:.3f}") for img, qj, sj in zip(negs, q, s, strict=True)]
                for rid, prompt, pos, negs, q, s in table
            ]
            logger.log_table(key="negatives/preview", columns=columns, data=data, step=trainer.global_step)
        elif name == "TensorBoardLogger":
            import numpy as np

            logger.experiment.add_image("negatives/preview", np.asarray(grid), epoch, dataformats="HWC")
        elif getattr(logger, "log_dir", None):
            out = Path(logger.log_dir) / "negatives" / f"epoch_{epoch:03d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            grid.save(out)
            log.info("negatives preview for epoch %d: %s", epoch, out)
