"""The response-pair inputs of the terms (``TermInputs.paired``, ``.spans``) from one step's row log-probs.

The rows are ``misp.dpo.batching``'s: chosen, rejected, chosen under each negative, then each negative's own
response ``y_k`` under the negative and under the positive. Summed log-probs give ``PairedResponses``; the
per-token ones (``misp.logprobs.response_token_logps``, for terms with ``token_mask``) with the batch's span
masks give ``EditSpans``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from misp.batch import PreferenceBatch
from misp.dpo.batching import split_pair_rows, split_rows
from misp.dpo.reference import ReferenceCache
from misp.dpo.terms import CellTokenLogps, EditSpans, PairedLogps, PairedResponses


def paired_responses(policy: Tensor, reference: Tensor, b: int, k: int, valid: Tensor | None = None) -> PairedResponses:
    """``[2B + 3BK]`` summed log-probs of the policy and the reference -> the pairs' cells ``[B, K]`` (``valid``:
    the draws with their own response, ``ResponsePairRows.valid``)."""
    return PairedResponses(PairedLogps(*split_pair_rows(policy, b, k)), PairedLogps(*split_pair_rows(reference, b, k)),
                           None if valid is None else valid.to(policy.device))


def _fit(tokens: Tensor, width: int) -> Tensor:
    """``[..., L]`` cut or zero-padded to ``[..., width]`` (entries past a response's end are 0 anyway)."""
    if tokens.shape[-1] >= width:
        return tokens[..., :width]
    return F.pad(tokens, (0, width - tokens.shape[-1]))


def cell_tokens(tokens: Tensor, b: int, k: int, chosen_width: int, own_width: int) -> CellTokenLogps:
    """``[2B + 3BK, L]`` per-token log-probs -> the four cells, y_p's at ``chosen_width``, y_k's at ``own_width``."""
    chosen, _, chosen_edit = split_rows(tokens, b, k)
    own, swapped = split_pair_rows(tokens, b, k)
    return CellTokenLogps(
        _fit(chosen, chosen_width), _fit(chosen_edit, chosen_width), _fit(own, own_width), _fit(swapped, own_width)
    )


def edit_spans(batch: PreferenceBatch, policy_tokens: Tensor, reference_tokens: Tensor) -> EditSpans:
    """The span inputs of IC-VCO's single-image branch: the four cells per token, and the batch's span masks."""
    pairs = batch.pairs
    if pairs is None or pairs.chosen_span is None:
        raise ValueError("a term reads edit spans, but the batch carries none (its source gives no edit_spans)")
    b, k = batch.batch_size, batch.k
    chosen_mask, own_mask = pairs.chosen_span.to(torch.bool), pairs.own_span.to(torch.bool)
    wc, wo = chosen_mask.shape[-1], own_mask.shape[-1]
    return EditSpans(cell_tokens(policy_tokens, b, k, wc, wo), cell_tokens(reference_tokens, b, k, wc, wo),
                     chosen_mask, own_mask)


class TokenReferenceCache(ReferenceCache):
    """Per-token reference log-probs of rows, by the reference cache's row keys, for terms over edited spans.

    ``misp.dpo.reference.ReferenceCache`` keeps one summed value per row; IC-VCO's single-image branch sums
    the reference's tokens over each edit's span, so it needs each row's tokens. Rows are kept trimmed to their
    own response length; a key whose image is a seeded transform (new every epoch) is not kept. Bound to the
    reference's fingerprint like the summed cache, and saved in checkpoints as plain lists.
    """

    _pack = staticmethod(list)
    _unpack = staticmethod(tuple)

    def lookup(self, keys: list, width: int) -> tuple[Tensor, Tensor]:
        """``[N, width]`` cached rows (0 where missing or past a row's end) and the mask of rows to compute."""
        values = torch.zeros(len(keys), width, dtype=torch.float64)
        missing = torch.ones(len(keys), dtype=torch.bool)
        for i, key in enumerate(keys):
            row = self.values.get(key)
            if row is not None:
                values[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
                missing[i] = False
        self.hits += int((~missing).sum())
        self.misses += int(missing.sum())
        return values, missing

    def store(self, keys: list, tokens: Tensor, counts: Tensor) -> None:
        """Keep each row's first ``counts[i]`` token log-probs (``tokens [N, L]``)."""
        for key, row, n in zip(keys, tokens.tolist(), counts.tolist(), strict=True):
            if self.cacheable(key):
                self.values[key] = tuple(row[: int(n)])
