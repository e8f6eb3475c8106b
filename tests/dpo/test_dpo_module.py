"""MISPDPOModule end to end: every method's config fits, LoRA reference, 4-bit QLoRA, exact resume."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from misp.cli import main
from misp.data.negative_sampler import NegativeSamplerDataModule
from misp.demo import method_configs
from misp.dpo import MISPDPOModule
from misp.dpo.batching import concatenate_rows
from misp.dpo.method import Method
from misp.models.clip import ClipSpec
from misp.models.vlm import LoraSpec, VLMSpec
from misp.negatives.mining import MiningConfig

ROOT = Path(__file__).resolve().parents[2]
MINING = MiningConfig(n_candidates=8, pool_size=4, embed_batch_size=64, dup_threshold=0.99999)


def read_metrics(root: Path) -> list[dict]:
    files = sorted(root.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {root}"
    with open(files[-1]) as f:
        return list(csv.DictReader(f))


def cli_overrides(tiny_world, clip_dir, sae_dir, vlm_dir) -> list[str]:
    return [
        f"--model.init_args.vlm.path={vlm_dir}",
        f"--data.records_file={tiny_world / 'pref.jsonl'}",
        f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}",
        f"--data.validation.pope_file={tiny_world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={tiny_world / 'val.jsonl'}",
        "--trainer.max_steps=3", "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=4",
        "--data.progress=false",
    ]


POOL_ARGS = ["--data.mining.n_candidates=8", "--data.mining.pool_size=4", "--data.mining.dup_threshold=0.99999"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "mdpo", "chip", "random_neg", "misp_dpo", "misp_mixed", "clip_dpo"])
def test_every_method_config_fits(method, tiny_world, clip_dir, sae_dir, vlm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *method_configs(method, ROOT), *cli_overrides(tiny_world, clip_dir, sae_dir, vlm_dir)]
    misp = method in ("misp_dpo", "misp_mixed")
    if method == "random_neg" or misp:
        args += [f"--data.pool={tiny_world / 'pool.jsonl'}", f"--data.clip.checkpoint={clip_dir}", *POOL_ARGS]
    if misp:
        args += [f"--data.sae_path={sae_dir}"]
    main(args)
    rows = read_metrics(tmp_path / "runs")
    logged = set().union(*(k for r in rows for k, v in r.items() if v))
    names = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"} <= names, logged
    image = {"loss/image", "rewards/img_pos", "rewards/img_neg", "img/accuracies"}
    # Each term logs its own metrics, and only the terms that run log anything.
    assert (image <= names) == (method not in ("dpo", "clip_dpo")) and (not image & names) == (method in ("dpo", "clip_dpo"))
    assert ("loss/anchor" in names) == (method == "mdpo")
    assert ({"is/ess", "is/max_weight"} <= names) == misp
    assert not ({"is/ess", "is/max_weight"} & names) or misp
    if misp:
        assert {"loss/proposal", "proposal/temperature"} <= names
        ckpt = torch.load(tmp_path / f"runs/shapes/{method}/checkpoints/last.ckpt", weights_only=False)
        assert ckpt["state_dict"]["proposal.w"].abs().sum() > 0  # q_phi was trained
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / f"runs/shapes/{method}/export/config.json").exists()


def crop_data(tiny_world, tmp_path, module) -> NegativeSamplerDataModule:
    dm = NegativeSamplerDataModule(records_file=str(tiny_world / "pref.jsonl"), batch_size=4,
                                   cache_dir=str(tmp_path / "cache"), progress=False, preview_records=0)
    dm.attach(module)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_lora_reference_stays_the_base_while_the_policy_moves(tiny_world, vlm_dir, tmp_path):
    torch.manual_seed(0)
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0)),
                           method=Method.preset("mdpo"), cache_reference=False)
    assert module.reference is None  # no second copy: the reference is the policy with adapters off
    batch = next(iter(crop_data(tiny_world, tmp_path, module).train_dataloader()))
    rows = concatenate_rows(batch, module.processor.tokenizer.pad_token_id)

    def logps():
        with torch.no_grad():
            return module._logps(module.model, rows, batch.images.tensors["pixel_values"]), module._reference_logps(batch, rows)

    policy0, ref0 = logps()
    torch.testing.assert_close(policy0, ref0)  # LoRA B starts at zero: policy == reference
    optimizer = torch.optim.Adam(module.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        module._logps(module.model, rows, batch.images.tensors["pixel_values"]).sum().backward()
        optimizer.step()
    policy1, ref1 = logps()
    assert not torch.allclose(policy1, policy0)
    torch.testing.assert_close(ref1, ref0, rtol=0, atol=0)


def test_4bit_qlora_trains_on_cpu(tiny_world, vlm64_dir, tmp_path):
    import bitsandbytes as bnb

    spec = VLMSpec(path=str(vlm64_dir), load_in_4bit=True, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    module = MISPDPOModule(spec, method=Method.preset("mdpo"), lr=1e-2, cache_reference=False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.model.modules())
    dm = crop_data(tiny_world, tmp_path, module)
    batch = next(iter(dm.train_dataloader()))
    rows = concatenate_rows(batch, module.processor.tokenizer.pad_token_id)
    base_before = module._reference_logps(batch, rows)
    lora_before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    after = dict(module.model.named_parameters())
    assert lora_before and all("lora_" in n for n in lora_before)
    assert any(not torch.equal(after[n], p) for n, p in lora_before.items())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # The frozen 4-bit base still computes exactly what it did (bitsandbytes may repack its storage on CPU).
    torch.testing.assert_close(module._reference_logps(batch, rows), base_before, rtol=0, atol=0)


class _Crash(L.Callback):
    """Kills the run when epoch 1 starts, after epoch 0's checkpoint is written."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated crash")


def _misp_run(root: Path, tiny_world, clip_dir, sae_dir, vlm_dir, crash=False, ckpt_path=None) -> list[dict]:
    L.seed_everything(0)
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("misp_dpo"), lr=1e-3)
    dm = NegativeSamplerDataModule(
        records_file=str(tiny_world / "pref.jsonl"), pool=str(tiny_world / "pool.jsonl"),
        clip=ClipSpec(checkpoint=str(clip_dir)), sae_path=str(sae_dir), mining=MINING, batch_size=8,
        cache_dir=str(root.parent / "cache"), progress=False, preview_records=0,
    )
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=0, accelerator="cpu",
        reload_dataloaders_every_n_epochs=1, log_every_n_steps=1, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
        logger=L.pytorch.loggers.CSVLogger(root, name="logs"),
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "ckpt", save_last=True)]
        + ([_Crash()] if crash else []),
    )
    dm.attach(module)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except RuntimeError as e:
        assert crash and "simulated crash" in str(e)
    return [r for r in read_metrics(root / "logs") if r.get("train/loss")]


@pytest.mark.slow
def test_resumed_fit_reproduces_the_uninterrupted_one(tiny_world, clip_dir, sae_dir, vlm_dir, tmp_path):
    full = _misp_run(tmp_path / "full", tiny_world, clip_dir, sae_dir, vlm_dir)
    _misp_run(tmp_path / "part", tiny_world, clip_dir, sae_dir, vlm_dir, crash=True)
    resumed = _misp_run(tmp_path / "part", tiny_world, clip_dir, sae_dir, vlm_dir,
                        ckpt_path=str(tmp_path / "part/ckpt/last.ckpt"))
    second_epoch = [float(r["train/loss"]) for r in full if r["epoch"] == "1"]
    resumed_second = [float(r["train/loss"]) for r in resumed if r["epoch"] == "1"]
    assert len(second_epoch) == 3
    torch.testing.assert_close(torch.tensor(resumed_second), torch.tensor(second_epoch), rtol=1e-5, atol=1e-6)
    # The second epoch reused reference log-probs cached in the first (restored from the checkpoint).
    hit_rates = [float(r["reference/cache_hit_rate"]) for r in resumed if r["epoch"] == "1"]
    assert max(hit_rates) > 0


@pytest.mark.slow
def test_4bit_checkpoint_holds_the_trainable_state_and_restores_it(tiny_world, vlm64_dir, tmp_path):
    """A single-process 4-bit QLoRA checkpoint: no 4-bit base inside, and a fresh module (base reloaded from
    its path) continues from it with the trained adapters (Lightning's `--ckpt_path` path, `misp test` too)."""
    spec = VLMSpec(path=str(vlm64_dir), load_in_4bit=True, lora=LoraSpec(r=4, alpha=8, dropout=0.0))

    def module():
        return MISPDPOModule(spec, method=Method.preset("mdpo"), lr=1e-2)

    trained = module()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(trained, datamodule=crop_data(tiny_world, tmp_path, trained))
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state)  # neither the 4-bit base nor its quantisation state
    assert ckpt.stat().st_size < 2_000_000

    restored = module()
    again = L.Trainer(max_steps=2, accelerator="cpu", logger=False, default_root_dir=tmp_path / "again",
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    again.fit(restored, datamodule=crop_data(tiny_world, tmp_path / "again", restored), ckpt_path=ckpt)
    for name, param in restored.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained.state_dict()[name], rtol=0, atol=0)


def test_a_checkpoint_without_the_models_adapters_is_refused(vlm_dir):
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir), lora=LoraSpec(r=4, alpha=8)), method=Method.preset("dpo"))
    with pytest.raises(ValueError, match="lacks .* trainable weights"):
        module.on_load_checkpoint({"state_dict": {"proposal.w": torch.zeros(4)}})


# gradient diagnostics (diagnostics_every_n_steps) ---------------------------------------------------------


def test_gradient_diagnostics_are_logged_on_the_configured_steps_only(tiny_world, vlm_dir, tmp_path):
    torch.manual_seed(0)
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("mdpo"),
                           diagnostics_every_n_steps=2, lr=1e-3)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", log_every_n_steps=1, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"))
    trainer.fit(module, datamodule=crop_data(tiny_world, tmp_path, module))
    rows = read_metrics(tmp_path / "logs")
    terms = ["text", "image", "anchor"]
    keys = {f"diag/grad_{kind}/{t}" for kind in ("norm", "share") for t in terms}
    keys |= {"diag/grad_cos/text_image", "diag/grad_cos/text_anchor", "diag/grad_cos/image_anchor"}
    assert [r["step"] for r in rows if r.get("train/loss")] == ["0", "1", "2", "3"]
    diagnosed = [r for r in rows if r.get("diag/grad_share/text")]
    assert [r["step"] for r in diagnosed] == ["0", "2"]  # and not repeated at the steps between
    for r in diagnosed:
        assert all(r.get(k) for k in keys), keys - {k for k, v in r.items() if v}
        assert abs(sum(float(r[f"diag/grad_share/{t}"]) for t in terms) - 1) < 1e-4
        assert all(float(r[f"diag/grad_norm/{t}"]) > 0 for t in terms)
    assert not any(r.get(k) for r in rows if r not in diagnosed for k in keys)
    assert {"img/advantage_std", "img/advantage_p10", "img/advantage_p90"} <= {k for r in rows for k, v in r.items() if v}


def test_gradient_diagnostics_leave_the_steps_gradients_unchanged(tiny_world, vlm_dir, tmp_path, monkeypatch):
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0)),
                           method=Method.preset("mdpo"), cache_reference=False)
    with torch.no_grad():  # LoRA B starts at zero: move off it, or the image and anchor gradients start degenerate
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    batch = next(iter(crop_data(tiny_world, tmp_path, module).train_dataloader()))
    measured: list[dict] = []
    diagnose = module._gradient_diagnostics

    def spy(term_losses: dict) -> dict:
        measured.append(diagnose(term_losses))
        return measured[-1]

    monkeypatch.setattr(module, "_gradient_diagnostics", spy)

    def step_grads(every: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        module.hparams.diagnostics_every_n_steps = every
        module.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = module.training_step(batch, 0)  # no trainer attached: self.log is a no-op, global_step is 0
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.trainable_parameters()]

    loss_off, grads_off = step_grads(0)
    assert not measured
    loss_on, grads_on = step_grads(1)
    assert len(measured) == 1
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)
    for on, off in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-8)
    # The terms measured add up to this very step's gradient g (.grad):
    # ||g||^2 = sum_i ||g_i||^2 + 2 sum_{i<j} cos_ij ||g_i|| ||g_j||, and the shares sum to 1.
    d = {k: float(v) for k, v in measured[0].items()}
    terms = ("text", "image", "anchor")
    norm = {t: d[f"diag/grad_norm/{t}"] for t in terms}
    assert all(n > 0 for n in norm.values())
    squared = sum(n**2 for n in norm.values()) + 2 * sum(
        d[f"diag/grad_cos/{a}_{b}"] * norm[a] * norm[b] for a, b in [("text", "image"), ("text", "anchor"), ("image", "anchor")]
    )
    g = torch.cat([x.reshape(-1) for x in grads_on]).double()
    assert squared == pytest.approx(float(g @ g), rel=1e-4)
    assert sum(d[f"diag/grad_share/{t}"] for t in terms) == pytest.approx(1.0, abs=1e-5)


def test_gradient_diagnostics_leave_the_proposal_term_out(vlm_dir):
    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("misp_dpo"),
                           diagnostics_every_n_steps=1)
    w = module.trainable_parameters()[0]
    q = next(module.proposal.parameters())
    term_losses = {"image": (w**2).sum().expand(2), "text": w.sum().expand(2), "proposal": q.sum().expand(2)}
    metrics = module._gradient_diagnostics(term_losses)
    assert set(metrics) == {"diag/grad_norm/image", "diag/grad_norm/text", "diag/grad_share/image",
                            "diag/grad_share/text", "diag/grad_cos/image_text"}


def test_gradient_diagnostics_are_refused_under_fsdp(vlm_dir):
    from misp.errors import ConfigError
    from misp.training.fsdp import FSDPStrategy

    module = MISPDPOModule(VLMSpec(path=str(vlm_dir)), method=Method.preset("dpo"),
                           diagnostics_every_n_steps=5)
    module.trainer = L.Trainer(strategy=FSDPStrategy(), accelerator="cpu", devices=1, logger=False,
                               enable_progress_bar=False)
    with pytest.raises(ConfigError, match="diagnostics_every_n_steps=5 needs whole gradients.*FSDPStrategy"):
        module.on_fit_start()
    module.hparams.diagnostics_every_n_steps = 0
    module.on_fit_start()  # off: FSDP runs as before
    with pytest.raises(ConfigError, match=">= 0"):
        MISPDPOModule(VLMSpec(path=str(vlm_dir)), diagnostics_every_n_steps=-1)
