"""Contrastive CLIP training on the Shapes world, with open_clip's own loss.

Real users start from a pretrained CLIP; on the Shapes world misp makes one, so that the negative
miner has an embedding space in which colour, shape and position changes are meaningful.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from misp.hparams import save_plain_hyperparameters
from misp.models.clip import ClipSpec, load_clip, save_clip
from misp.training.optim import adamw_with_warmup_cosine


class ContrastiveCLIPModule(L.LightningModule):
    """Trains an open_clip model with the symmetric InfoNCE loss and reports retrieval accuracy.

    Args:
        clip: which CLIP to train (the tiny config for the Shapes world, or a checkpoint to continue).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before cosine decay.
        export_dir: where the trained CLIP is written at the end of fit, as a directory that
            ``ClipSpec(checkpoint=...)`` (and open_clip) load; later stages point at it.
    """

    def __init__(
        self,
        clip: ClipSpec,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        save_plain_hyperparameters(self)
        # Built here, not in configure_model: the datamodule needs the transforms and tokenizer at setup.
        self.bundle = load_clip(clip)
        self.model = self.bundle.model
        self.model.train()  # loaders hand models over in eval mode; Lightning keeps each module's mode
        self.loss_fn = ClipLoss()
        self._val_features: list[tuple[torch.Tensor, torch.Tensor]] = []

    def data_values(self):
        """The handshake (``misp.data.handshake``): the data prepares images and captions with the CLIP bundle."""
        from misp.data.handshake import ModuleValues

        return ModuleValues(clip=self.bundle)

    @property
    def preprocess(self):
        return self.bundle.preprocess

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    def _features(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.model.encode_image(images), dim=-1)
        text = F.normalize(self.model.encode_text(tokens), dim=-1)
        return image, text

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, text = self._features(batch["images"], batch["tokens"])
        loss = self.loss_fn(image, text, self.model.logit_scale.exp())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(image))
        self.log("train/logit_scale", self.model.logit_scale.exp(), batch_size=len(image))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._val_features.append(self._features(batch["images"], batch["tokens"]))

    def on_validation_epoch_end(self) -> None:
        if not self._val_features:
            return
        image = torch.cat([f[0] for f in self._val_features])
        text = torch.cat([f[1] for f in self._val_features])
        self._val_features.clear()
        metrics = retrieval_accuracy(image, text)
        metrics["val/chance"] = 1.0 / len(image)
        self.log_dict(metrics, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> dict:
        return adamw_with_warmup_cosine(
            self.model.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            warmup_steps=self.hparams.warmup_steps,
            total_steps=self.trainer.estimated_stepping_batches,
        )

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            save_clip(self.bundle, Path(self.hparams.export_dir))


def retrieval_accuracy(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """Top-1 image->text and text->image retrieval accuracy over a held-out slice (row i matches i).

    Identical captions (two scenes described alike) count as correct, since no model can tell them apart.
    """
    sims = image @ text.T
    target = torch.arange(len(image), device=image.device)
    same_text = (text @ text.T) > 0.9999
    i2t = same_text[target, sims.argmax(dim=1)].float().mean()
    same_image = (image @ image.T) > 0.9999
    t2i = same_image[target, sims.argmax(dim=0)].float().mean()
    return {"val/i2t_acc": float(i2t), "val/t2i_acc": float(t2i)}
