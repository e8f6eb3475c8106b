"""The per-epoch share of drawn negatives not yet solved (``train/unsolved_share``), logged during fit."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from misp.data.negative_sampler import NegativeSamplerDataModule
from misp.dpo import MISPDPOModule
from misp.dpo.diagnostics import UNSOLVED_MARGIN, unsolved_share
from misp.dpo.method import Method
from misp.models.vlm import VLMSpec


def test_a_negative_is_solved_once_the_positive_beats_it_by_the_margin():
    assert UNSOLVED_MARGIN == pytest.approx(math.log(9.0))
    # At the margin the negative's own pairwise loss softplus(a) has a tenth of its largest gradient.
    a = torch.tensor(-UNSOLVED_MARGIN, requires_grad=True)
    torch.nn.functional.softplus(a).backward()
    assert float(a.grad) == pytest.approx(0.1)
    eps = 1e-4
    advantages = torch.tensor([[0.5, -UNSOLVED_MARGIN - eps, -1.0], [-5.0, -UNSOLVED_MARGIN + eps, 3.0]])
    assert float(unsolved_share(advantages)) == pytest.approx(4 / 6)
    assert float(unsolved_share(advantages, margin=0.0)) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        unsolved_share(torch.zeros(3, 0))


def test_fit_logs_the_unsolved_share_once_per_epoch(tiny_world, vlm_dir, tmp_path):
    # lr 0: the policy stays the reference, so every a_i is 0 and no negative is solved.
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("mdpo"), lr=0.0,
                           cache_reference=False)
    dm = NegativeSamplerDataModule(records_file=str(tiny_world / "pref.jsonl"), batch_size=2,
                                   cache_dir=str(tmp_path / "cache"), progress=False, preview_records=0)
    dm.attach(module)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, accelerator="cpu", logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/unsolved_share")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert all(float(r["train/unsolved_share"]) == 1.0 for r in rows)
