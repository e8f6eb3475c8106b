"""SymMPO and IC-VCO fit end to end on a tiny format-6 world: edits drawn with their own captions, the pair
rows run through the policy and the reference, and the pair terms trained on."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from misp.cli import main
from misp.demo import method_configs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def edits_world(tmp_path_factory):
    """A few records of the Shapes world with object edits (format 6), and a tiny LLaVA over its words."""
    from misp.smoke import SMOKE_WORLD, smoke_vlm
    from misp.world import WorldConfig, write_world

    root = tmp_path_factory.mktemp("edits_world")
    config = SMOKE_WORLD | dict(n_clip=8, n_sft=8, n_pool=8, n_pref=8, n_test=4, n_val=4, object_edits=2)
    write_world(root / "world", WorldConfig(**config), progress=False)
    return root / "world", smoke_vlm(root / "world", root / "vlm")


def _fit(method: str, world: Path, vlm: Path, tmp_path: Path, *extra: str) -> list[dict]:
    main([
        "fit", *method_configs(method, ROOT),
        f"--model.init_args.vlm.path={vlm}",
        f"--data.records_file={world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={world / 'test.jsonl'}",
        f"--data.validation.pope_file={world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={world / 'val.jsonl'}",
        "--data.batch_size=2", "--data.progress=false", "--data.preview_records=0",
        "--trainer.max_steps=2", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra,
    ])
    files = sorted((tmp_path / "runs").rglob("metrics.csv"))
    assert files
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def _logged(rows: list[dict]) -> set[str]:
    return {k for r in rows for k, v in r.items() if v}


def _losses(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([float(r["train/loss"]) for r in rows if r.get("train/loss")])


@pytest.mark.slow
def test_symmpo_fits_on_the_worlds_captioned_edits(edits_world, tmp_path, monkeypatch):
    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    rows = _fit("symmpo", world, vlm, tmp_path, "--model.init_args.method.negatives.k=2")
    assert {"loss/text", "loss/pairs", "loss/margin", "loss/pair_anchors", "pairs/accuracy_edit"} <= _logged(rows)
    losses = _losses(rows)
    assert len(losses) == 2 and torch.isfinite(losses).all()
    # Untrained, policy = reference: every pair's logit is 0, so L_pairs = 2 log 2 at the first step.
    first = next(r for r in rows if r.get("loss/pairs"))
    assert float(first["loss/pairs"]) == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-4)


@pytest.mark.slow
def test_icvco_fits_on_the_edited_spans(edits_world, tmp_path, monkeypatch):
    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    rows = _fit("icvco", world, vlm, tmp_path)
    assert {"loss/pairs_span", "loss/pair_anchors_span", "pairs_span/accuracy_positive"} <= _logged(rows)
    assert "loss/text" not in _logged(rows)
    losses = _losses(rows)
    assert len(losses) == 2 and torch.isfinite(losses).all()


@pytest.mark.slow
def test_misp_ground_fits_on_the_mixed_pool_and_pairs_only_the_edits(edits_world, clip_dir, sae_dir, tmp_path,
                                                                      monkeypatch):
    world, vlm = edits_world
    monkeypatch.chdir(tmp_path)
    seen = []
    from misp.dpo import module as dpo_module

    step = dpo_module.MISPDPOModule.training_step

    def recorded(self, batch, i):
        seen.append(batch)
        return step(self, batch, i)

    monkeypatch.setattr(dpo_module.MISPDPOModule, "training_step", recorded)
    rows = _fit("misp_ground", world, vlm, tmp_path, f"--data.pool={world / 'pool.jsonl'}",
                f"--data.clip.checkpoint={clip_dir}", f"--data.sae_path={sae_dir}", "--data.mining.n_candidates=8",
                "--data.mining.pool_size=6", "--data.mining.dup_threshold=0.99999")
    assert {"loss/image", "loss/text", "loss/anchor", "loss/pairs", "loss/proposal", "cool/weight_mean",
            "is/ess"} <= _logged(rows)
    assert torch.isfinite(_losses(rows)).all()
    refs = [ref for batch in seen for record in batch.negatives for ref in record]
    edits = [ref for ref in refs if ref.response is not None]
    assert edits and all("pref_cf" in ref.path for ref in edits)  # only the record's own edits carry a caption
    assert all(ref.response is None for ref in refs if "pref_cf" not in ref.path)
    for batch in seen:
        flags = batch.pairs.valid
        expected = torch.tensor([[ref.response is not None for ref in r] for r in batch.negatives])
        assert torch.equal(flags, expected) if flags is not None else bool(expected.all())
