"""Prefix sharing: rows that share their image and prompt compute that prefix once, in one packed row.

A preference step scores the chosen and the rejected response under the same image and prompt: two rows
whose first ~650 tokens (LLaVA-1.5: 576 image tokens and the prompt) are identical. Here such rows are
packed into one row ``[prefix, response_1, response_2, ...]`` with a block attention mask (every response
attends to the prefix and to itself, never to another response) and the position ids each token has in
its own unpacked row, so every response token sees exactly the keys, values and positions it sees unpacked:
the log-probs and gradients are those of the unshared rows, up to float rounding (summation order).

Positions are taken from the unpacked rows (the family computes them: 1-D over real tokens, or Qwen's 3-D
M-RoPE from the image grids) and gathered into the packed layout, so a response's positions restart after
the prefix in every family, M-RoPE included (text after an image continues from the prefix's max position).

Why a packed row with a mask, not a key/value cache of the prefix: ``bench/prefix_sharing.py`` measured
both on LLaVA-1.5 geometry (CPU): the packed row 1.84x the unshared pair, KV reuse 1.39x; the packed row
also goes through the model's own forward (so LoRA, 4-bit, gradient checkpointing and FSDP see an ordinary
call) and needs no cache plumbing that differs between transformers releases. docs/performance.md.

Rows that share nothing (a response under a negative image, an SFT row) stay as they are, unless bin
packing is on (padding-free, ``plan_packing(padding_free=True)``): then the sequences (the shared groups and
the rows of their own alike) are packed several to a row, first-fit decreasing, into rows no longer than
the longest sequence, each sequence attending only to itself under the block mask and keeping its own
positions, so the linear layers no longer run on padding. :func:`choose_layout` runs, per batch, the
cheapest layout by linear-layer tokens and attention pairs. The mask is dense (SDPA or eager attention); attention implementations that take no 4-D mask (FlashAttention's varlen
kernels) and rows the family cannot mask exactly fall back to the unshared forward, with the reason logged
once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from misp.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)

MASKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take an explicit 4-D mask (the packed rows' block mask)."""

_logged: set[str] = set()


def log_fallback_once(reason: str) -> None:
    """Log why prefix sharing is off for a forward, once per distinct reason (not once per step)."""
    if reason not in _logged:
        _logged.add(reason)
        log.warning("packing (prefix sharing, bin packing) off for this forward (the unshared rows run instead): %s", reason)


@dataclass
class PackPlan:
    """How N unpacked rows map into R packed rows, and back.

    A *sequence* is what one block of a packed row holds: a group of rows sharing image and prompt
    (``[prefix, response_1, response_2, ...]``), or one row on its own. Without bin packing each packed row
    holds one sequence; with it (padding-free), several, one after another, each attending only to itself.

    ``source_row[r, q]`` / ``source_pos[r, q]``: the unpacked row and position whose token packed position
    ``q`` of packed row ``r`` holds (padding: row of the packed row's first member, position 0).
    ``packed_at[n, t]``: the packed position of unpacked row n's position t (padding positions: the
    sequence's first position; their labels are ignored). ``segment[r, q]``: 0 on a sequence's shared
    prefix, j >= 1 on its j-th response, -1 on padding. ``sequence[r, q]``: the sequence (index into
    ``groups``) position q belongs to, -1 on padding.
    """

    groups: list[list[int]]
    """Each sequence's unpacked rows (its members), in order."""
    group_of: torch.Tensor
    """``[N]`` long: the packed row of each unpacked row."""
    source_row: torch.Tensor
    source_pos: torch.Tensor
    segment: torch.Tensor
    packed_at: torch.Tensor
    lengths: torch.Tensor
    """``[R]`` long: each packed row's real length."""
    prefix: torch.Tensor
    """``[S]`` long: each sequence's shared prefix length."""
    sequence: torch.Tensor
    rows: list[list[int]]
    """Each packed row's sequences (indices into ``groups``), in the order they sit in it."""
    start: torch.Tensor
    """``[S]`` long: each sequence's first position in its packed row."""

    @property
    def shares(self) -> bool:
        """Whether any sequence holds more than one response (else prefix sharing saves nothing)."""
        return any(len(g) > 1 for g in self.groups)

    @property
    def width(self) -> int:
        """The packed rows' padded length."""
        return self.segment.shape[1]


def _first_scored(labels: torch.Tensor) -> torch.Tensor:
    """``[N]``: the position of each row's first scored label (the response's first token); its length when
    it has none."""
    scored = labels != IGNORE_INDEX
    first = scored.float().argmax(dim=1)
    return torch.where(scored.any(dim=1), first, torch.full_like(first, labels.shape[1]))


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins of total size at most ``capacity`` (a size above it gets a bin of its own), as few as first-fit
    decreasing finds: items longest first (ties: lower index first), each into the first bin it fits.
    Returns each bin's item indices in the order they were placed."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def plan_packing(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 slot_keys: list[tuple[int, ...]], share: bool = True, padding_free: bool = False,
                 capacity: int | None = None) -> PackPlan | None:
    """Group right-padded rows whose tokens before their first scored label are identical and whose images
    are the same (``slot_keys[n]``: the images row n reads, in order); None when rows are left-padded.

    Only the prefix is shared, so a response needs nothing of another; rows without scored labels and rows
    of a group of one are sequences of their own, unchanged. ``share=False``: every row is a sequence of
    its own. ``padding_free``: the sequences are bin-packed (:func:`first_fit_decreasing`) into packed rows
    of at most ``capacity`` tokens (default: the longest sequence, so no packed row is longer than the
    padded layout's); else each sequence is a packed row.
    """
    n, t = input_ids.shape
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    if n and not bool(mask[torch.arange(n), (lengths - 1).clamp(min=0)].all() and mask[:, 0].all()):
        return None  # left padding (or empty rows): leave them to the unshared forward
    first = _first_scored(labels)
    ids_cpu, first_cpu, len_cpu = input_ids.cpu(), first.cpu().tolist(), lengths.cpu().tolist()
    by_key: dict[tuple, int] = {}
    groups: list[list[int]] = []
    for i in range(n):
        p = first_cpu[i]
        if not share or p >= len_cpu[i] or p == 0:
            groups.append([i])  # nothing scored (or no prefix): nothing to share
            continue
        key = (slot_keys[i], tuple(ids_cpu[i, :p].tolist()))
        if key in by_key:
            groups[by_key[key]].append(i)
        else:
            by_key[key] = len(groups)
            groups.append([i])
    g_len = [first_cpu[g[0]] + sum(len_cpu[m] - first_cpu[m] for m in g) if first_cpu[g[0]] < len_cpu[g[0]]
             else len_cpu[g[0]] for g in groups]
    if padding_free:
        rows = first_fit_decreasing(g_len, capacity if capacity is not None else max(g_len, default=0))
    else:
        rows = [[s] for s in range(len(groups))]
    row_len = [sum(g_len[s] for s in r) for r in rows]
    width = max(row_len) if row_len else 0
    source_row = torch.zeros(len(rows), width, dtype=torch.long)
    source_pos = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    sequence = torch.full((len(rows), width), -1, dtype=torch.long)
    packed_at = torch.zeros(n, t, dtype=torch.long)
    group_of = torch.zeros(n, dtype=torch.long)
    prefix = torch.zeros(len(groups), dtype=torch.long)
    start = torch.zeros(len(groups), dtype=torch.long)
    for g, seqs in enumerate(rows):
        at = 0
        source_row[g, :] = groups[seqs[0]][0]
        for s in seqs:
            members = groups[s]
            head = members[0]
            p = min(first_cpu[head], len_cpu[head])
            prefix[s], start[s] = p, at
            source_row[g, at : at + p] = head
            source_pos[g, at : at + p] = torch.arange(p)
            segment[g, at : at + p] = 0
            sequence[g, at : at + g_len[s]] = s
            begin, at = at, at + p
            for j, m in enumerate(members, start=1):
                group_of[m] = g
                r = len_cpu[m] - p
                source_row[g, at : at + r] = m
                source_pos[g, at : at + r] = torch.arange(p, len_cpu[m])
                segment[g, at : at + r] = j
                packed_at[m, :] = begin  # padding positions: the sequence's first (labels ignored)
                packed_at[m, :p] = torch.arange(begin, begin + p)
                packed_at[m, p : len_cpu[m]] = torch.arange(at, at + r)
                at += r
    return PackPlan(groups, group_of, source_row, source_pos, segment, packed_at,
                    torch.tensor(row_len, dtype=torch.long), prefix, sequence, rows, start)


def block_mask(plan: PackPlan, image_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, 1, W, W]`` bool, True where a query may attend a key: causal, within the query's own sequence,
    and there within the prefix or the query's own response. Padding queries attend themselves only (never
    read; keeps softmax finite).

    ``image_blocks`` (``[R, W]`` long, 0 off images, the image's number in its packed row on its tokens)
    adds the families' bidirectional attention among one image's tokens (Gemma 3's ``token_type_ids``).
    """
    seg, seq = plan.segment, plan.sequence
    w = seg.shape[1]
    causal = torch.ones(w, w, dtype=torch.bool).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    allow = causal & (seq[:, :, None] >= 0) & (seq[:, :, None] == seq[:, None, :]) & ((k == 0) | (k == q))
    if image_blocks is not None:
        allow |= (image_blocks[:, :, None] > 0) & (image_blocks[:, :, None] == image_blocks[:, None, :])
    allow |= torch.eye(w, dtype=torch.bool) & (q < 0)  # padding: itself
    return allow[:, None]


def gather_packed(values: torch.Tensor, plan: PackPlan) -> torch.Tensor:
    """``values [..., N, T]`` of the unpacked rows in the packed layout ``[..., R, W]`` (ids, positions)."""
    return values[..., plan.source_row.to(values.device), plan.source_pos.to(values.device)]


def unpack_logits(packed: torch.Tensor, plan: PackPlan, keep: int, t: int) -> torch.Tensor:
    """The unpacked rows' logits ``[N, keep, V]`` on their last ``keep`` positions (of T), from the packed
    rows' logits ``[R, K, V]`` on their last K positions. Position t of row n reads packed position
    ``packed_at[n, t]``; the logit that predicts a response's first token is the shared prefix's last one."""
    start = plan.width - packed.shape[1]
    at = plan.packed_at[:, t - keep :] - start
    at = at.clamp(min=0)  # padding positions (labels ignored) may map before the window
    rows = plan.group_of[:, None].expand_as(at)
    return packed[rows.to(packed.device), at.to(packed.device)]


def packed_keep(plan: PackPlan) -> int:
    """The packed rows' trailing positions whose logits any response reads (from each prefix's last token)."""
    return plan.width - max(int((plan.start + plan.prefix).min()) - 1, 0)


def attention_pair_weight(text_config) -> float:
    """The cost of one attention pair (a query against a key) relative to one token through a decoder
    layer's linear layers, in FLOPs: ``4 h d_h`` (scores and the weighted sum) against
    ``2 (d (h + 2 h_kv) d_h + h d_h d + 3 d f)`` (q, k, v, o and a gated MLP)."""
    d = int(text_config.hidden_size)
    h = int(text_config.num_attention_heads)
    h_kv = int(getattr(text_config, "num_key_value_heads", None) or h)
    d_h = int(getattr(text_config, "head_dim", None) or d // h)
    f = int(text_config.intermediate_size)
    return 4 * h * d_h / (2 * (d * (h + 2 * h_kv) * d_h + h * d_h * d + 3 * d * f))


def layout_cost(rows: int, width: int, pair_weight: float) -> float:
    """What ``rows`` rows of ``width`` tokens cost a decoder layer, in token-through-the-linear-layers units:
    every position runs the linear layers (padding too) and every query meets every key (a dense mask
    computes each pair, masked or not), ``pair_weight`` (:func:`attention_pair_weight`) each."""
    return rows * width * (1.0 + width * pair_weight)


def choose_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  slot_keys: list[tuple[int, ...]], prefix_sharing: bool, padding_free: bool,
                  pair_weight: float) -> PackPlan | None:
    """The packed layout to run for these (expanded, right-padded) rows, or None for the unshared rows.

    Without ``padding_free`` (the rule from before bin packing, kept so that those runs' numbers stay
    bitwise what they were): the prefix-shared layout when it runs fewer tokens than the unshared rows.
    With it: the cheapest by :func:`layout_cost` (linear-layer tokens and dense attention pairs, padding
    included; ``pair_weight`` from :func:`attention_pair_weight`) of the unshared rows, the prefix-shared
    rows, and the shared groups or the single rows bin-packed; ties go to the simpler layout, in that order.
    All give the same log-probs; a layout that saves tokens can still cost more attention (a long packed
    sequence of short prefix and long responses), and then the unshared rows run.
    """
    n, t = input_ids.shape
    plan = plan_packing(input_ids, attention_mask, labels, slot_keys, share=prefix_sharing)
    if plan is None:
        log_fallback_once("the rows are left-padded (packing reads right-padded rows)")
        return None
    if not padding_free:
        if not plan.shares:
            return None
        if len(plan.groups) * int(plan.lengths.max()) >= n * t:
            # Packed rows are padded to the longest of them, and the rows that share nothing (responses under
            # negative images) to that length too: with short prefixes that padding costs more than the
            # prefixes saved. Both layouts give the same log-probs, so the cheaper one runs.
            log_fallback_once("packing would run more padded tokens than the unshared rows (prefixes short beside "
                              "their responses, or few rows sharing one); checked per batch")
            return None
        return plan
    candidates = [plan] if plan.shares else []
    if plan.shares:
        candidates.append(plan_packing(input_ids, attention_mask, labels, slot_keys, padding_free=True))
    candidates.append(plan_packing(input_ids, attention_mask, labels, slot_keys, share=False, padding_free=True))
    best, best_cost = None, layout_cost(n, t, pair_weight)
    for candidate in candidates:
        cost = layout_cost(len(candidate.rows), candidate.width, pair_weight)
        if cost < best_cost:
            best, best_cost = candidate, cost
    return best
