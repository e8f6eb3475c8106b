"""Per-sequence log-probabilities of response tokens, extracted from causal-LM logits.

``logp(y|x,m)`` in method.md is the SUM of the response tokens' log-probabilities; prompt, image and
padding positions carry the label ``-100`` and are skipped. Logits at position t predict the label at
t + 1 (the usual causal shift).

Memory: a VLM batch of logits is ``[N, T, V]`` with V up to ~150k, often in bf16. ``log_softmax`` over
all of it in float32 would materialise a second, larger copy (and autograd would keep it). Here only the
response positions are visited, in row chunks: for each chunk the label logit is gathered and the
logsumexp is computed in float32, and the backward pass writes ``onehot - softmax`` chunk by chunk into
one gradient tensor of the logits' own dtype. Peak extra memory is one float32 chunk of
``chunk_rows x V``, independent of the sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["IGNORE_INDEX", "response_token_counts", "response_token_logps", "sequence_logps"]

IGNORE_INDEX = -100
"""Label value of positions that are not scored (prompt, image tokens, padding)."""

# float32 elements per chunk (64 MiB); large enough to keep the kernels efficient.
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TokenLogProbs(torch.autograd.Function):
    """``log softmax(logits[n, t])[label]`` at selected positions, chunked in forward and backward."""

    @staticmethod
    def forward(
        ctx, logits: Tensor, rows_n: Tensor, rows_t: Tensor, targets: Tensor, chunk_rows: int
    ) -> Tensor:
        dtype = _compute_dtype(logits.dtype)
        out = torch.empty(rows_n.shape[0], dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, rows_n.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            x = logits[rows_n[sl], rows_t[sl]].to(dtype)
            lse[sl] = torch.logsumexp(x, dim=-1)
            out[sl] = x.gather(-1, targets[sl].unsqueeze(-1)).squeeze(-1) - lse[sl]
        ctx.save_for_backward(logits, rows_n, rows_t, targets, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, rows_n, rows_t, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for start in range(0, rows_n.shape[0], ctx.chunk_rows):
            sl = slice(start, start + ctx.chunk_rows)
            x = logits[rows_n[sl], rows_t[sl]].to(lse.dtype)
            g = grad_out[sl].unsqueeze(-1)
            # d(x_y - lse(x))/dx = onehot(y) - softmax(x)
            chunk = -g * torch.exp(x - lse[sl].unsqueeze(-1))
            chunk.scatter_add_(-1, targets[sl].unsqueeze(-1), g)
            # (n, t) pairs are unique, so plain index assignment is exact.
            grad[rows_n[sl], rows_t[sl]] = chunk.to(grad.dtype)
        return grad, None, None, None, None


def _check_inputs(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [N, T] = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def response_token_counts(labels: Tensor) -> Tensor:
    """Number of scored response tokens per sequence: labels after the causal shift that are not -100.

    Args:
        labels: ``[N, T]`` token ids with ``-100`` on unscored positions.

    Returns:
        ``[N]`` int64 counts (the denominators :func:`sequence_logps` uses with ``average=True``).
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [N, T], got shape {tuple(labels.shape)}")
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=-1)


def sequence_logps(
    logits: Tensor, labels: Tensor, average: bool = False, chunk_rows: int | None = None
) -> Tensor:
    """Summed (or mean) log-probability of each sequence's response tokens.

    Args:
        logits: ``[N, T, V]`` causal-LM logits, any float dtype (bf16/fp16 are upcast per chunk).
        labels: ``[N, T]`` target ids aligned with the input ids, ``-100`` where not scored.
        average: return the mean over response tokens instead of the sum (0 for rows with none).
        chunk_rows: token positions processed per chunk; default keeps a chunk near 64 MiB of float32.

    Returns:
        ``[N]`` log-probabilities in float32 (float64 for float64 logits); 0 for rows with no response
        token. Differentiable with respect to ``logits``.
    """
    _check_inputs(logits, labels)
    n, _, v = logits.shape
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    bad = scored & ((targets < 0) | (targets >= v))
    if bad.any():
        raise ValueError(
            f"labels hold ids outside [0, {v}) other than {IGNORE_INDEX}: {targets[bad][:5].tolist()}"
        )
    rows_n, rows_t = scored.nonzero(as_tuple=True)
    token_logps = _TokenLogProbs.apply(logits, rows_n, rows_t, targets[rows_n, rows_t].long(), chunk_rows)
    totals = token_logps.new_zeros(n).index_add(0, rows_n, token_logps)
    if average:
        totals = totals / scored.sum(dim=-1).clamp_min(1).to(totals.dtype)
    return totals


def response_token_logps(logits: Tensor, labels: Tensor, chunk_rows: int | None = None) -> Tensor:
    """Each response token's log-probability, in response order: ``[N, L]``, L the most scored tokens of a row.

    Row n's j-th entry is the log-prob of its j-th scored label (after the causal shift); entries past a
    row's own count are 0, so ``.sum(-1)`` is :func:`sequence_logps` (up to summation order). Masks over a
    response's tokens (IC-VCO's edited span, ``misp.losses.masked_logps``) index this layout.
    """
    _check_inputs(logits, labels)
    n, _, v = logits.shape
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // max(v, 1))
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows_n, rows_t = scored.nonzero(as_tuple=True)
    token_logps = _TokenLogProbs.apply(logits, rows_n, rows_t, targets[rows_n, rows_t].long(), chunk_rows)
    # nonzero is row-major: a token's place in its response is its rank among its row's scored positions.
    place = torch.cumsum(scored.long(), dim=-1)[rows_n, rows_t] - 1
    width = int(scored.sum(-1).max()) if n else 0
    out = token_logps.new_zeros(n, width)
    return out.index_put((rows_n, place), token_logps)
