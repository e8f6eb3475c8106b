"""The base of every LightningModule that trains a VLM: build, shard, evaluate, export.

Subclasses (SFT, MISP-DPO) add a training step; everything a user sees about evaluation (POPE and CHAIR
tables, logged metrics, sample answers) is the same for all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from misp.data.eval_data import EvalData
from misp.data.handshake import DataDescription, ModuleValues, not_attached
from misp.eval.loop import Evaluator, GenerationEval
from misp.eval.metrics import format_results
from misp.models.sharding import gather_full_state_dict, is_sharded, shard_vlm
from misp.models.vlm import VLMSpec, load_vlm, save_vlm, save_vlm_state, unwrap_peft
from misp.training.optim import adamw_with_warmup_cosine
from misp.utils.io import atomic_write_json, atomic_write_jsonl

log = logging.getLogger(__name__)


class VLMModule(L.LightningModule):
    """Shared plumbing for VLM modules; not trained on its own.

    Args:
        vlm: which VLM to load (pretrained path with optional 4-bit and LoRA, or the tiny Shapes model).
        generation: how evaluation answers are generated.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before cosine decay.
        export_dir: where the trained model and processor are saved (Hugging Face layout) at the end of
            fit, so that the next stage loads them with ``VLMSpec(path=...)``.
    """

    def __init__(
        self,
        vlm: VLMSpec,
        generation: GenerationEval | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        # The processor is needed by the datamodule at setup, before configure_model runs.
        self.model, self.processor = load_vlm(vlm)
        self.model.train()  # loaders hand models over in eval mode; Lightning keeps each module's mode
        self.generation = generation or GenerationEval()
        self.evaluator: Evaluator | None = None
        self._evaluator_key: tuple | None = None  # the (objects, synonyms, pairs) self.evaluator was built with
        # Handed over by `datamodule.attach(module)`: the sets `test` reports and those validated on during fit.
        self.eval_data: EvalData | None = None
        self.val_data: EvalData | None = None
        # Checkpoints hold the trainable state only (see on_save_checkpoint); the frozen rest comes from
        # the base's path. on_load_checkpoint checks that nothing trainable is missing instead.
        self.strict_loading = False
        self._trainable_keys: set[str] | None = None

    def data_values(self) -> ModuleValues:
        """The handshake's first half (``misp.data.handshake``): the data encodes with this VLM's processor."""
        return ModuleValues(processor=self.processor)

    def attach_data(self, data: DataDescription) -> None:
        """The handshake's second half: the evaluation and validation sets whose vocabulary, synonyms and
        pairs CHAIR and co-occurrence read."""
        self._attached = True
        self.eval_data = data.evaluation
        self.val_data = data.validation or self.eval_data

    def vlms(self) -> list[torch.nn.Module]:
        """Every VLM this module holds (the policy; DPO adds its frozen reference): all are sharded alike."""
        return [self.model]

    def configure_model(self) -> None:
        # Under ModelParallelStrategy (FSDP2) Lightning hands us a device mesh; other strategies wrap the
        # model themselves (strategy=fsdp uses the config's auto_wrap_policy).
        if self.device_mesh is None or getattr(self, "_sharded", False):
            return
        names = self.device_mesh.mesh_dim_names or ()
        mesh = self.device_mesh["data_parallel"] if "data_parallel" in names else self.device_mesh
        for vlm in self.vlms():
            shard_vlm(vlm, mesh)
        self._sharded = True

    def setup(self, stage: str) -> None:
        if not getattr(self, "_attached", False):
            # Without it CHAIR would run on empty vocabularies and report nothing, silently.
            raise not_attached(self, "data description (evaluation sets)")
        self.trainable_state_keys()  # before the strategy wraps the model (FSDP renames parameters)
        # fit and validate score the validation sets, test the evaluation sets: their vocabularies may differ
        # (sets from another world or with their own synonyms), so the metrics follow the stage's sets.
        data: EvalData | None = self.eval_data if stage == "test" else self.val_data
        objects = data.chair_objects() if data is not None else []
        synonyms = data.synonyms() if data is not None else {}
        pairs = data.pairs() if data is not None else []
        key = (objects, sorted(synonyms.items()), pairs)
        if self.evaluator is None or key != self._evaluator_key:
            self.evaluator = Evaluator(self.generation, objects, synonyms, pairs)
            self._evaluator_key = key

    # evaluation -------------------------------------------------------------------------------------
    def _eval_step(self, batch: dict) -> None:
        self.evaluator.update(self.model, self.processor, batch)

    def _eval_epoch_end(self, prefix: str) -> dict[str, float]:
        results = self.evaluator.compute()
        samples = self.evaluator.samples
        if prefix == "test":
            self._write_generations(self.evaluator.generations)
        self.evaluator.reset()
        if not results:
            return results
        self.log_dict({f"{prefix}/{k}": v for k, v in results.items()}, sync_dist=False)
        # self.print: rank zero only, and routed through the progress bar (a rich bar captures stdout).
        self.print(f"\n{prefix} results ({type(self).__name__}):\n{format_results(results)}")
        for s in samples[:4]:
            self.print(f"  [{s['task']}] {s['prompt']!r} -> {s['answer']!r}")
        return results

    def _write_generations(self, records: list[dict]) -> None:
        """Every test answer, from every rank, to ``<default_root_dir>/generations/<task>.jsonl`` (as
        ``misp eval`` writes them: id, prompt, answer, judgement)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero or not records:
            return
        by_task: dict[str, list[dict]] = {}
        for r in records:
            by_task.setdefault(r["task"], []).append({k: v for k, v in r.items() if k != "task"})
        for task, rows in by_task.items():
            atomic_write_jsonl(Path(self.trainer.default_root_dir) / "generations" / f"{task}.jsonl", rows)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        results = self._eval_epoch_end("val")
        if results and self.trainer.state.fn == TrainerFn.VALIDATING and self.trainer.is_global_zero:
            # `misp validate` (not the validation inside fit): the copy an experiment chooses settings by.
            atomic_write_json(Path(self.trainer.default_root_dir) / "validation_results.json", results)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._eval_epoch_end("test")
        if self.test_results and self.trainer.is_global_zero:
            # A machine-readable copy next to the run, for the demo summary and for scripts.
            atomic_write_json(Path(self.trainer.default_root_dir) / "test_results.json", self.test_results)

    # export -------------------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if not self.hparams.get("export_dir"):
            return
        out = Path(self.hparams.export_dir)
        if self.trainer.world_size > 1 and is_sharded(self.model):
            # A collective from the outermost module (FSDP1 gathers only from its root); a LoRA export
            # needs the adapters alone, not a gathered copy of the frozen base.
            state = gather_full_state_dict(
                self.trainer.strategy.model, trainable_only=unwrap_peft(self.model) is not self.model, prefix="model."
            )
            if self.trainer.is_global_zero:
                save_vlm_state(self.model, self.processor, out, state)
            self.trainer.strategy.barrier("misp-export")
        elif self.trainer.is_global_zero:
            save_vlm(self.model, self.processor, out)
        if self.trainer.is_global_zero:
            log.info("exported the trained VLM to %s", out)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_groups(self) -> list[dict]:
        """AdamW parameter groups: the VLM's trainable weights; subclasses add their own (the proposal)."""
        return [{"params": self.trainable_parameters(), "weight_decay": self.hparams.weight_decay}]

    def configure_optimizers(self) -> dict:
        # One recipe for every VLM module: AdamW, linear warm-up, cosine decay over the whole fit.
        return adamw_with_warmup_cosine(
            self.parameter_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
            warmup_steps=self.hparams.warmup_steps, total_steps=self.trainer.estimated_stepping_batches,
        )

    # checkpoints: the trainable state only -------------------------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        """State-dict keys of every trainable parameter (LoRA, proposal; all weights in a full fine-tune).

        Taken before any sharding wraps the modules, so the names are the plain ones checkpoints use.
        """
        if self._trainable_keys is None:
            self._trainable_keys = {n for n, p in self.named_parameters() if p.requires_grad}
        return self._trainable_keys

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A 4-bit base is GBs that never change and cannot be loaded back through load_state_dict (its
        # quantisation-state keys): leave it out. Optimiser states already cover trainable weights only.
        keys = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict")
        if state is None:  # a sharded checkpoint: the FSDP strategy has loaded and checked the weights
            return
        missing = sorted(self.trainable_state_keys() - state.keys())
        if missing:
            where = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
            raise ValueError(
                f"checkpoint {where or ''} lacks {len(missing)} trainable weights of this model (e.g. {missing[:3]}): "
                "it was written for another model, adapter or method"
            )

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = self.trainer.strategy.model
        if gradient_clip_val and isinstance(root, FSDP) and gradient_clip_algorithm in (None, "norm"):
            # Lightning's FSDP precision plugin refuses norm clipping: the norm must be taken over every
            # rank's shard, which only the root FSDP module's own clip_grad_norm_ does.
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
