"""MISPDPOModule: preference optimisation of a VLM; every method of method.md is a config of it.

Per step: one forward of the policy over the concatenated rows (chosen and rejected on the positive,
chosen on each of the K negatives; each image encoded once), the reference log-probs (cached across
epochs where the image recurs), the objective of misp.dpo.objective, and for MISP-DPO the proposal
q_phi's own loss, which moves it toward the model's preference distribution over negatives.

Opt-in diagnostic (``diagnostics_every_n_steps``): on those steps, each term's share of the policy's
gradient (``misp.dpo.diagnostics.gradient_shares``), logged as ``diag/grad_norm/<term>``,
``diag/grad_share/<term>`` and ``diag/grad_cos/<a>_<b>``.
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.fsdp import fully_shard

from misp.batch import ImageInputs, PreferenceBatch
from misp.data.handshake import DataDescription, ModuleValues, NegativesDescription, ProposalFeatures
from misp.dpo.batching import (
    ConcatenatedRows,
    concatenate_rows,
    row_keys,
    select_rows,
    split_in_context,
    split_rows,
)
from misp.dpo.diagnostics import gradient_shares, unsolved_share
from misp.dpo.method import Method
from misp.dpo.objective import PreferenceObjective, SequenceLogps, preference_terms, sum_terms
from misp.dpo.pairs import TokenReferenceCache, edit_spans, paired_responses
from misp.dpo.reference import (
    ReferenceCache,
    frozen_copy,
    reference_fingerprint,
    reference_mode,
    uses_adapters,
)
from misp.dpo.terms import InContextPairs, ResponseCells
from misp.errors import ConfigError
from misp.eval.loop import GenerationEval
from misp.hparams import plain, save_plain_hyperparameters
from misp.logprobs import response_token_counts, response_token_logps, sequence_logps
from misp.losses import image_advantages
from misp.methods import DEFAULT_METHOD
from misp.models.forward import response_logits
from misp.models.sharding import is_sharded, unsharded
from misp.models.vlm import VLMSpec
from misp.negatives.proposal import ProposalNet, gather_log_q
from misp.training.vlm_module import VLMModule

log = logging.getLogger(__name__)


class MISPDPOModule(VLMModule):
    """DPO, mDPO, CHiP-style, random multi-negative and MISP-DPO, chosen by ``method``.

    Args:
        vlm: the policy: usually the SFT export (Shapes) or a pretrained LLaVA with 4-bit base and LoRA.
        method: the objective's beta and named terms, and the negatives they need (source, K), checked when
            built (``misp.dpo.method``); a method file of ``configs/methods/``. None: the paper's,
            ``configs/methods/misp_dpo.yaml``. The data draws the negatives it names (``attach``).
        proposal_eps: defensive floor of q_phi: every importance weight is at most M / eps.
        proposal_lr: learning rate of q_phi's parameters (w, log tau), trained by the ProposalFit term.
        cache_reference: keep reference log-probs per (record, response, image) across epochs.
        generation: how evaluation answers are generated.
        lr: peak AdamW learning rate of the policy.
        weight_decay: AdamW weight decay of the policy.
        warmup_steps: linear warm-up steps before cosine decay.
        export_dir: where the trained policy is saved at the end of fit (LoRA merged into the base).
        diagnostics_every_n_steps: every this many optimiser steps (0: never), measure how much of the
            policy's gradient each objective term supplies and log ``diag/grad_norm/<term>``,
            ``diag/grad_share/<term>`` (``<g_term, g> / ||g||^2``, the shares sum to 1, negative when the
            term is undone by the others) and ``diag/grad_cos/<a>_<b>`` for each pair of terms. Measured
            over the policy's trainable weights, so the proposal term (it trains q_phi only; its
            advantages are detached) is left out. Costs one extra backward per term on those steps and
            holds one gradient per term; it does not change the step's gradients. Logged to the loggers on
            exactly those steps (regardless of ``log_every_n_steps``). Single device or DDP (gradients
            averaged across ranks first); refused under FSDP, where a rank holds a shard.
        prefix_sharing: run the rows that share image and prompt (the chosen and rejected responses on the
            positive image) as one packed row, the image and prompt computed once, in the policy and the
            reference forward (``misp.models.prefix_sharing``; same log-probs and gradients to float
            rounding). Where the model's attention cannot take the block mask (FlashAttention) the
            unshared rows run and the reason is logged once. false: no shared prefixes (with
            ``padding_free`` on, whole rows may still be bin-packed; both false: always the unshared rows).
        padding_free: bin-pack the forward's sequences (the shared groups and the rows of their own, such
            as responses under negative images) several to a row, first-fit decreasing into rows no longer
            than the longest, so the linear layers skip the padding; each sequence attends only to itself
            and keeps its positions (same log-probs and gradients to float rounding). Per batch the
            cheapest of the unshared, prefix-shared and bin-packed layouts runs (tokens through the linear
            layers and attention pairs). Same attention implementations as ``prefix_sharing``; with both
            off, every number is what it was before either existed. docs/performance.md section 5.
    """

    def __init__(
        self,
        vlm: VLMSpec,
        method: Method | None = None,
        proposal_eps: float = 0.1,
        proposal_lr: float = 1e-2,
        cache_reference: bool = True,
        generation: GenerationEval | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        export_dir: str | None = None,
        diagnostics_every_n_steps: int = 0,
        prefix_sharing: bool = True,
        padding_free: bool = True,
    ) -> None:
        if diagnostics_every_n_steps < 0:
            raise ConfigError(f"model.diagnostics_every_n_steps must be >= 0 (0: off), got {diagnostics_every_n_steps}")
        super().__init__(vlm, generation, lr, weight_decay, warmup_steps, export_dir)
        self.method = method if method is not None else Method.preset(DEFAULT_METHOD)
        save_plain_hyperparameters(self)
        # The method as run (the default filled in), so that checkpoints and model cards name it.
        self.hparams["method"] = plain(self.method)
        self.objective: PreferenceObjective = self.method.objective
        self._check_images_per_prompt()
        # q_phi exists to be trained (ProposalFit); without that term the draws stay uniform over the M selected.
        self.proposal = ProposalNet(eps=proposal_eps) if self.method.uses_proposal else None
        self.reference = None if uses_adapters(self.model) else frozen_copy(self.model)
        self.reference_cache = ReferenceCache() if cache_reference else None
        self.negatives: NegativesDescription | None = None  # q_phi's features, from `datamodule.attach`
        # Terms over edited spans read the reference per token: those rows are cached per token too.
        self.reference_token_cache = (TokenReferenceCache() if cache_reference and self.objective.uses_edit_spans
                                      else None)
        if self.reference_cache is not None:
            # Now, while every weight is whole on this process: sharding wraps and splits them later.
            self.reference_cache.bind(reference_fingerprint(self.model, self.reference))
            if self.reference_token_cache is not None:
                self.reference_token_cache.bind(self.reference_cache.fingerprint)

    def _check_images_per_prompt(self) -> None:
        """IC-VCO's two-image terms need a family that takes two images in one prompt: refuse others in one line."""
        from misp.models.families import family_for_processor

        family = family_for_processor(self.processor)
        wanting = [t.name for t in self.objective.terms if t.needs_in_context]
        if wanting and family.max_images is not None and family.max_images < 2:
            raise ConfigError(
                f"terms {wanting} read pairs in a two-image context, but a {family.name} model takes "
                f"{family.max_images} image per prompt: drop them (the single-image branch runs alone) or use a "
                "family that takes several (Qwen2.5-VL, Qwen3-VL, Gemma 3)"
            )

    # setup ----------------------------------------------------------------------------------------
    def vlms(self) -> list[torch.nn.Module]:
        return [self.model] + ([self.reference] if self.reference is not None else [])

    def configure_model(self) -> None:
        super().configure_model()
        if self.proposal is not None and self.device_mesh is not None and not is_sharded(self.proposal):
            # Under FSDP2 nothing reduces the gradients of an unsharded module across ranks: shard q_phi too,
            # so every rank keeps the same proposal (and draws the same negatives for a record).
            names = self.device_mesh.mesh_dim_names or ()
            fully_shard(self.proposal, mesh=self.device_mesh["data_parallel"] if "data_parallel" in names else self.device_mesh)

    @torch.no_grad()
    def proposal_log_q(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """log q_phi over every record's candidates ``[R, M]`` (float64, CPU), between training steps.

        None without a proposal. Every rank must call it together: under FSDP it gathers q_phi's shards.
        """
        if self.proposal is None:
            return None
        root = self.trainer.strategy.model if self._trainer is not None else None
        with unsharded(self.proposal, root) as proposal:
            param = next(proposal.parameters())
            return proposal.log_probs(features.to(param.device, param.dtype), mask.to(param.device)).double().cpu()

    def data_values(self) -> ModuleValues:
        """The handshake's first half: the processor, q_phi's reader the data draws each epoch through, and
        the method's negatives (source and K) for the data to draw."""
        return ModuleValues(processor=self.processor, proposal_log_q=self.proposal_log_q, negatives=self.method.negatives,
                            in_context=self.objective.uses_in_context)

    def attach_data(self, data: DataDescription) -> None:
        """The handshake's second half: also q_phi's features of the data's mined negatives."""
        super().attach_data(data)
        self.negatives = data.negatives

    def _features(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """q_phi's features ``[B, M, F]`` and mask ``[B, M]`` of the records ``ids`` (from the handshake)."""
        store: ProposalFeatures | None = self.negatives.proposal_features() if self.negatives is not None else None
        if store is None:
            raise ConfigError(
                f"{type(self).__name__} trains q_phi, but its data has no SAE-selected negatives' features: "
                "use method.negatives.source: sae and call `datamodule.attach(module)` before Trainer.fit"
            )
        return store.for_records(ids, self.device)

    def on_fit_start(self) -> None:
        if self.hparams.diagnostics_every_n_steps and self._sharded_training():
            # Under FSDP a rank's gradient is a shard (and taking one outside the step's backward would run
            # FSDP's gather/reshard hooks out of turn): per-shard shares would be wrong numbers, not no numbers.
            raise ConfigError(
                f"model.diagnostics_every_n_steps={self.hparams.diagnostics_every_n_steps} needs whole gradients, "
                f"but the policy is sharded ({type(self.trainer.strategy).__name__}): measure gradient shares on one "
                "device or under DDP, or set it to 0"
            )
        if self.method.negatives.drawn > 0 and self.trainer.reload_dataloaders_every_n_epochs != 1:
            log.warning(
                "trainer.reload_dataloaders_every_n_epochs is %s: negatives are drawn once and reused; "
                "set it to 1 so each epoch draws fresh ones (method.md 4.4)",
                self.trainer.reload_dataloaders_every_n_epochs,
            )

    # log-probs --------------------------------------------------------------------------------------
    def _logps(self, model, rows: ConcatenatedRows, images: ImageInputs) -> torch.Tensor:
        # Logits only from the first response position on: the image and prompt logits carry no log-prob.
        logits, labels = response_logits(model, rows.input_ids, rows.attention_mask, images, rows.labels, rows.image_index,
                                          prefix_sharing=self.hparams.get("prefix_sharing", True),
                                          padding_free=self.hparams.get("padding_free", False))
        return sequence_logps(logits, labels)

    @staticmethod
    def _token_logps(model, rows: ConcatenatedRows, images: ImageInputs) -> torch.Tensor:
        """Per-token response log-probs ``[N, L]`` (for terms that read edited spans)."""
        logits, labels = response_logits(model, rows.input_ids, rows.attention_mask, images, rows.labels, rows.image_index)
        return response_token_logps(logits, labels)

    def _reference_logps(self, batch: PreferenceBatch, rows: ConcatenatedRows) -> torch.Tensor:
        keys = row_keys(batch)
        if self.reference_cache is not None:
            values, missing = self.reference_cache.lookup(keys)
        else:
            values, missing = torch.zeros(len(keys), dtype=torch.float64), torch.ones(len(keys), dtype=torch.bool)
        if bool(missing.any()):
            need = missing.nonzero().squeeze(1).to(rows.input_ids.device)
            subset, images = select_rows(rows, need)
            with reference_mode(self.model, self.reference) as reference:
                computed = self._logps(reference, subset, batch.images.select(images)).double().cpu()
            values[missing] = computed
            if self.reference_cache is not None:
                self.reference_cache.store([keys[i] for i in need.tolist()], computed)
        return values.to(rows.input_ids.device, torch.float32)

    def _reference_token_logps(self, batch: PreferenceBatch, rows: ConcatenatedRows, width: int) -> torch.Tensor:
        """Per-token reference log-probs ``[N, width]`` of every row, the rows seen before from the token cache."""
        keys = row_keys(batch)
        cache = self.reference_token_cache
        if cache is not None:
            values, missing = cache.lookup(keys, width)
        else:
            values, missing = torch.zeros(len(keys), width, dtype=torch.float64), torch.ones(len(keys), dtype=torch.bool)
        if bool(missing.any()):
            need = missing.nonzero().squeeze(1).to(rows.input_ids.device)
            subset, images = select_rows(rows, need)
            with reference_mode(self.model, self.reference) as reference:
                computed = self._token_logps(reference, subset, batch.images.select(images)).double().cpu()
            columns = min(width, computed.shape[1])
            values[missing, :columns] = computed[:, :columns]
            if cache is not None:
                cache.store([keys[i] for i in need.tolist()], computed, response_token_counts(subset.labels).cpu())
        return values.to(rows.input_ids.device, torch.float32)

    # training ---------------------------------------------------------------------------------------
    def training_step(self, batch: PreferenceBatch, batch_idx: int) -> torch.Tensor:
        rows = concatenate_rows(batch, self.processor.tokenizer.pad_token_id, self.method.negatives.drawn)
        b, k = rows.batch_size, rows.k
        spans = None
        if rows.pairs and self.objective.uses_edit_spans:
            # Terms over edited spans read per-token log-probs of every cell, the reference's too (cached per token).
            policy_tokens = self._token_logps(self.model, rows, batch.images)
            reference_tokens = self._reference_token_logps(batch, rows, policy_tokens.shape[1])
            policy_values, reference_values = policy_tokens.sum(-1), reference_tokens.sum(-1)
            spans = edit_spans(batch, policy_tokens, reference_tokens)
        else:
            policy_values = self._logps(self.model, rows, batch.images)
            reference_values = self._reference_logps(batch, rows)
        policy = SequenceLogps(*split_rows(policy_values, b, k))
        reference = SequenceLogps(*split_rows(reference_values, b, k))
        paired = paired_responses(policy_values, reference_values, b, k, batch.pairs.valid) if rows.pairs else None
        in_context = None
        if rows.in_context:
            in_context = InContextPairs(ResponseCells(*split_in_context(policy_values, b, k)),
                                        ResponseCells(*split_in_context(reference_values, b, k)))
        log_q = batch.log_q if k else None
        log_q_phi = None
        if self.proposal is not None:
            # Through forward, so that FSDP gathers q_phi's parameters.
            log_q_phi = gather_log_q(self.proposal(*self._features(batch.ids)), batch.draw_index)
        term_losses, metrics = preference_terms(self.objective, policy, reference, log_q, log_q_phi, paired, spans,
                                                in_context)
        loss = sum_terms(term_losses).mean()
        every = self.hparams.diagnostics_every_n_steps
        if every and self.global_step % every == 0:
            self._log_on_this_step_only(self._gradient_diagnostics(term_losses))
        if self.proposal is not None:
            metrics["proposal/temperature"] = self.proposal.last_temperature
        if self.reference_cache is not None:
            total = max(self.reference_cache.hits + self.reference_cache.misses, 1)
            metrics["reference/cache_hit_rate"] = torch.tensor(self.reference_cache.hits / total)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict(metrics, batch_size=b)
        if k:  # per epoch: the share of drawn negatives the positive image does not yet beat by the margin
            a = image_advantages(policy.chosen.detach(), policy.negatives.detach(), reference.chosen,
                                 reference.negatives, self.objective.beta)
            self.log("train/unsolved_share", unsolved_share(a), on_step=False, on_epoch=True, batch_size=b)
        return loss

    def _sharded_training(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        return isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)) or is_sharded(self.model)

    def _gradient_diagnostics(self, term_losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``diag/*`` metrics of this step: each policy-training term's gradient norm, share and cosines."""
        trains_policy = [t.name for t in self.objective.terms if not t.trains_proposal]
        losses = {name: term_losses[name].mean() for name in trains_policy}
        distributed = self._trainer is not None and self.trainer.world_size > 1

        def rank_mean(g: torch.Tensor) -> torch.Tensor:
            # DDP averages the ranks' gradients before the step: measure that gradient, not this rank's.
            return self.trainer.strategy.reduce(g, reduce_op="mean")

        stats = gradient_shares(losses, self.trainable_parameters(), reduce=rank_mean if distributed else None)
        metrics: dict[str, torch.Tensor] = {}
        for i, name in enumerate(trains_policy):
            metrics[f"diag/grad_norm/{name}"] = stats[name]["norm"].float()
            metrics[f"diag/grad_share/{name}"] = stats[name]["share"].float()
            for other in trains_policy[i + 1:]:
                metrics[f"diag/grad_cos/{name}_{other}"] = stats[name]["cos"][other].float()
        return metrics

    def _log_on_this_step_only(self, metrics: dict[str, torch.Tensor]) -> None:
        # Straight to the loggers, not through self.log: Lightning re-logs an on-step value at every later
        # step of the epoch until it is logged again, which would plot stale shares as if measured.
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        if self.proposal is not None:
            groups.append({"params": list(self.proposal.parameters()), "weight_decay": 0.0, "lr": self.hparams.proposal_lr})
        return groups

    # checkpoints --------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference_cache is not None:
            checkpoint["reference_cache"] = self.reference_cache.state_dict()
        if self.reference_token_cache is not None:
            checkpoint["reference_token_cache"] = self.reference_token_cache.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.reference_cache is not None and "reference_cache" in checkpoint:
            self.reference_cache.load_state_dict(checkpoint["reference_cache"])
        if self.reference_token_cache is not None and "reference_token_cache" in checkpoint:
            self.reference_token_cache.load_state_dict(checkpoint["reference_token_cache"])
