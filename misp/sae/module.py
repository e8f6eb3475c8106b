"""SAEModule: trains the sparse autoencoder on difference vectors served by NegativeSamplerDataModule."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from misp.data.handshake import DataDescription, DifferenceVectors, not_attached
from misp.errors import ConfigError
from misp.sae.io import save_sae
from misp.sae.metrics import sae_metrics
from misp.sae.model import SAEConfig, SparseAutoencoder


class SAEModule(L.LightningModule):
    """Trains a ``kl`` or ``topk`` SparseAutoencoder (method.md section 3) and exports it for mining.

    The input dimension comes from the datamodule (``difference_dim``), so a config only names the
    architecture. Logged: the loss parts, FVU, L0, dead fraction, reconstruction cosine and, for ``kl``,
    the mean activation against rho.

    Args:
        architecture: ``topk`` (Gao et al. 2024) or ``kl`` (as published for MISP-DPO).
        n_latents: number of latents h.
        top_k: topk: active latents per sample (k of Gao et al.).
        rho: kl: target mean activation.
        gamma: kl: weight of the KL sparsity penalty.
        auxk_coef: topk: weight of the AuxK loss on dead latents.
        aux_k: topk: dead latents used by AuxK per sample (None: 2k).
        dead_after: samples without firing after which a latent counts as dead.
        lr: Adam learning rate.
        init_sample: difference vectors used to set the pre-bias to the data mean.
        export_dir: where the trained SAE is written at the end of fit (loaded by the DPO configs).
    """

    def __init__(
        self,
        architecture: Literal["kl", "topk"] = "topk",
        n_latents: int = 128,
        top_k: int = 8,
        rho: float = 0.05,
        gamma: float = 1.0,
        auxk_coef: float = 1.0 / 32.0,
        aux_k: int | None = None,
        dead_after: int = 10_000,
        lr: float = 1e-3,
        init_sample: int = 8192,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sae: SparseAutoencoder | None = None
        self.data: DifferenceVectors | None = None  # from `datamodule.attach(module)`

    def attach_data(self, data: DataDescription) -> None:
        """The handshake's module side (``misp.data.handshake``): the SAE's input width, its initial
        pre-bias and export metadata come from the data's difference vectors."""
        if data.differences is None:
            raise ConfigError(
                "SAEModule trains on difference vectors: use NegativeSamplerDataModule with serve: differences"
            )
        self.data = data.differences

    def configure_model(self) -> None:
        if self.sae is not None:
            return
        h = self.hparams
        data = self.data
        if data is None:
            raise not_attached(self, "difference vectors")
        config = SAEConfig(
            d_in=data.dim(), architecture=h.architecture, n_latents=h.n_latents, k=h.top_k, rho=h.rho,
            gamma=h.gamma, auxk_coef=h.auxk_coef, aux_k=h.aux_k, dead_after=h.dead_after,
        )
        self.sae = SparseAutoencoder(config)
        # A resumed fit overwrites this with the checkpoint's weights; a fresh one starts at the data mean.
        self.sae.init_from_data(data.sample(h.init_sample))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        out = self.sae(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=len(batch))
        self.log_dict({f"train/{k}": v for k, v in out.losses.items()}, batch_size=len(batch))
        if batch_idx % 20 == 0:
            self.log_dict({f"train/{k}": v for k, v in sae_metrics(batch, out, self.sae).items()}, batch_size=len(batch))
        return out.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.sae.unit_norm_decoder:
            self.sae.remove_parallel_grads_()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.sae.unit_norm_decoder:
            self.sae.normalize_decoder_()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        out = self.sae(batch)
        metrics = sae_metrics(batch, out, self.sae)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=len(batch), prog_bar=False)
        self.log("val/loss", out.loss, batch_size=len(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.sae.parameters(), lr=self.hparams.lr)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            extra = self.data.metadata() if self.data is not None else {}
            save_sae(self.sae, Path(self.hparams.export_dir), extra)
