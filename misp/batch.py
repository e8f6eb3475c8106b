"""Typed contracts between the data room and the model room: images, negative references.

This module imports nothing from ``misp.data``, ``misp.dpo``, ``misp.negatives`` or ``misp.models``:
both sides import it, and neither has to import the other.

- :class:`ImageInputs` holds the U distinct images of a batch as the model family's processor prepared
  them (LLaVA: ``pixel_values [U, 3, H, W]``; Qwen2.5-VL: ``pixel_values [patches, D]`` and
  ``image_grid_thw [U, 3]``) with how many image tokens each one expands to in the text. Images of
  different sizes in one batch differ in that count, so rows are expanded against it.
- :class:`NegativeRef` names one negative image of one record: what made it (its registered source),
  and the pool index, file or seed it was made from. It is a ``NamedTuple`` so that it is hashable (a
  cache key) and Lightning moves batches holding it between devices (frozen dataclasses it refuses).
- :class:`TokenRows` and :class:`PreferenceBatch`: one collated preference step, what the data room
  writes (``misp.data.collate``) and the model room reads (``misp.dpo``). Plain (not frozen) dataclasses,
  so that Lightning's ``apply_to_collection`` moves them between devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class NegativeRef(NamedTuple):
    """One negative image of a record, as the data drew it.

    Sources whose negatives are files set ``path``; pool sources also set ``index`` (the position in
    the candidate pool); sources that make the negative from the positive (a crop, diffusion noise)
    set ``seed``. Two refs are the same negative exactly when they are equal.
    """

    source: str
    """The registered negative source that made it (``misp.negatives.sources``)."""
    path: str | None = None
    """The image file, for sources whose negatives are files."""
    index: int | None = None
    """The index in the candidate pool, for pool sources; for a source that makes a ranked list of versions
    of the positive (``occlude``), the version's rank, 1..``levels``."""
    seed: int | None = None
    """The seed of the transform of the positive, for sources that generate the negative."""
    levels: int | None = None
    """The length of the ranked list the version ``index`` belongs to (None for every other source)."""
    response: str | None = None
    """The negative image's own correct response (its caption), for sources that pair responses (``edits``);
    None for every other source. Part of the ref, so two captions of one image file are two negatives."""

    @property
    def names_file(self) -> bool:
        """Whether the image is a file (cacheable by its name), not made in memory from the positive."""
        return self.path is not None and self.seed is None

    def key(self) -> str:
        """A stable string for caches and logs."""
        if self.seed is not None:
            return f"{self.source}:{self.seed}" + ("" if self.levels is None else f":{self.index}/{self.levels}")
        base = f"{self.source}:{self.path if self.index is None else self.index}"
        return base if self.response is None else f"{base}|{self.response}"


@dataclass
class ImageInputs:
    """The U distinct images of a batch, in the tensors the model family's processor makes.

    ``tensors`` is passed to the model's forward as keyword arguments (``pixel_values``, and
    ``image_grid_thw`` or ``image_sizes`` where the family takes them). ``tokens_per_image[u]`` is the
    number of image tokens image u occupies in a text row.
    """

    tensors: dict[str, torch.Tensor]
    tokens_per_image: torch.Tensor
    """``[U]`` long."""
    rows_per_image: torch.Tensor | None = None
    """``[U]`` long: how many leading rows of the patch tensors (those whose first dimension is the sum of
    these) image u holds, for families that flatten every image's patches into one tensor (Qwen2.5-VL's
    ``pixel_values [patches, D]``); None when every tensor has one leading row per image (LLaVA)."""

    def __len__(self) -> int:
        return int(self.tokens_per_image.shape[0])

    def select(self, index: torch.Tensor) -> ImageInputs:
        """The images at ``index`` (``[M]`` long), in that order, as an ``ImageInputs`` of M images."""
        index = torch.as_tensor(index, dtype=torch.long)
        u = len(self)
        rows = self.rows_per_image
        if rows is not None:
            rows_cpu = rows.cpu()
            starts = torch.cumsum(rows_cpu, 0) - rows_cpu
            patch_index = torch.cat([torch.arange(int(starts[i]), int(starts[i] + rows_cpu[i])) for i in index.cpu().tolist()]
                                    or [torch.zeros(0, dtype=torch.long)])
        selected = {}
        for name, t in self.tensors.items():
            if rows is not None and t.shape[0] == int(rows.sum()) and t.shape[0] != u:
                selected[name] = t.index_select(0, patch_index.to(t.device))
            elif t.shape[0] == u:
                selected[name] = t.index_select(0, index.to(t.device))
            else:
                raise ValueError(f"ImageInputs tensor {name!r} has {t.shape[0]} rows, neither one per image ({u}) nor per patch")
        return ImageInputs(selected, self.tokens_per_image[index.to(self.tokens_per_image.device)],
                           None if rows is None else rows[index.to(rows.device)])

    def __getitem__(self, index: torch.Tensor) -> ImageInputs:
        """``select(index)``, so that code written for a ``[U, ...]`` pixel tensor indexes images alike."""
        return self.select(index)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageInputs:
        """On ``device``; floating tensors cast to ``dtype`` when given (integer ones never are)."""
        moved = {
            name: t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
            for name, t in self.tensors.items()
        }
        return ImageInputs(moved, self.tokens_per_image.to(device),
                           None if self.rows_per_image is None else self.rows_per_image.to(device))


@dataclass
class TokenRows:
    """B tokenised examples (prompt with its image tokens, then the response), right-padded to one length T."""

    input_ids: torch.Tensor
    """``[B, T]`` long; padding holds the tokenizer's pad id."""
    attention_mask: torch.Tensor
    """``[B, T]`` long; 0 on padding."""
    labels: torch.Tensor
    """``[B, T]`` long; the response's tokens, -100 on the prompt, the image tokens and padding."""


@dataclass
class ResponsePairRows:
    """Each negative's own correct response ``y_k`` on its record's prompt (response pairs: SymMPO, IC-VCO).

    The model runs these rows twice: under the negative image (``(m_k, y_k)``) and under the positive
    (``(m_p, y_k)``), see ``misp.dpo.batching``.
    """

    responses: TokenRows
    """``[B*K, T']`` record-major (record r's k-th at ``r*K + k``), tokenised as ``chosen`` is."""
    chosen_span: torch.Tensor | None = None
    """``[B, K, L]`` bool over ``y_p``'s response tokens (its labels, EOS included, in order): those edit k
    changes (``misp.data.pairs.edit_spans``); None when no term reads spans."""
    own_span: torch.Tensor | None = None
    """``[B, K, L']`` bool over ``y_k``'s response tokens: those its edit changes; None alike."""
    in_context: TokenRows | None = None
    """``[4*B*K, T'']`` IC-VCO's two-image rows ``[m_p, m_k]``, cell-major (the cells ``y_p | first``, ``y_k |
    first``, ``y_k | second``, ``y_p | second``: "answer based on the first / second image"), record-major
    within a cell; None unless a term reads the in-context pairs."""
    valid: torch.Tensor | None = None
    """``[B, K]`` bool: the draws that have their own response (a mixed pool draws retrieved images too, whose
    rows hold ``y_p`` as a placeholder and are masked out of the pair terms); None: every draw has one."""


@dataclass
class PreferenceBatch:
    """One preference step of B records, each with the K negatives its method drew (K may be 0).

    The model runs ``[chosen (B); rejected (B); chosen once per negative (B*K, record-major)]`` over
    ``images``: the B positives first, then the B*K negatives in the same record-major order, each image
    once (``misp.dpo.batching``).
    """

    ids: list[str]
    """``B`` record ids (errors and the reference cache name records by them)."""
    chosen: TokenRows
    """The chosen response on each record's prompt, ``[B, T_c]``."""
    rejected: TokenRows
    """The rejected response on each record's prompt, ``[B, T_r]``."""
    images: ImageInputs
    """``U = B + B*K`` images: the B positives, then record r's K negatives at ``B + r*K + j``."""
    negatives: list[list[NegativeRef]]
    """``[B][K]`` what each negative image is (a cache key: equal refs are the same image)."""
    log_q: torch.Tensor
    """``[B, K]`` float32: log-probability of each draw under the proposal that drew it (0: no proposal)."""
    draw_index: torch.Tensor
    """``[B, K]`` long: each draw's index in its record's candidate list (``M`` selected ones for ``sae``)."""
    pairs: ResponsePairRows | None = None
    """Each negative's own response, for a source that gives them (``paired_responses``); None otherwise."""

    @property
    def batch_size(self) -> int:
        """B, the records in this batch."""
        return len(self.ids)

    @property
    def k(self) -> int:
        """K, the negatives each record of this batch carries (the method's K, or 0 without negatives)."""
        return int(self.log_q.shape[1])
