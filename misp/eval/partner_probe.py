"""The partner-token probe: how much the caption's partner tokens depend on the partner being in the image.

A Shapes world generated with ``partner_scenes`` (format 6) holds, per evaluation split, scenes with a
trigger and its partner, each with a counterfactual render that has the partner removed (edits.jsonl,
val_edits.jsonl; docs/world.md). For each such (scene, removal) case the probe scores the tokens of the
partner's sentence of the scene's true caption, with the caption before it as context, under both images::

    gap = log p(partner tokens | prompt, caption before them, image WITH the partner)
        - log p(partner tokens | prompt, caption before them, image WITHOUT it)

``probe/partner_logp_gap`` is the mean gap over the cases (``probe/partner_cases`` of them). The
sentence's tokens include its position words, which an empty cell alone makes unlikely, so
``probe/partner_name_logp_gap`` scores the partner's name tokens alone ('blue square' of 'a small blue
square at the top.'), given the sentence's words before them: whether the model tells WHICH object is there. A model that
names the partner because it sees it has a large positive gap; one that names it from the trigger alone (the
language prior) has a gap near 0, however likely it finds the words; and one taught to suppress the word
lowers both log-probabilities alike, so the gap, unlike ``cooccurrence/partner_present_rate``, tells
looking from not saying. The means of both terms are reported too (``probe/partner_logp_present``,
``probe/partner_logp_removed``), so a gap can be read as "sees it" or "stopped saying it".

Float sums reduced by sum, so the means aggregate exactly across batches and ranks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric

from misp.data.records import RecordError, read_utf8


def _field(row: dict, key: str, kind: type, path: Path, line: int, where: str = ""):
    value = row.get(key)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        got = "missing" if key not in row else f"got {type(value).__name__}"
        raise RecordError(path, line, f"{where}{key}", f"expected {kind.__name__}, {got}")
    return value


def _image(value: str, root: Path, path: Path, line: int, where: str) -> str:
    image = root / value
    if not image.is_file():
        raise RecordError(path, line, where, f"image {image} not found")
    return str(image)


def read_edit_records(path: str | Path, image_root: str | Path | None = None) -> list[dict]:
    """The records of a world's edits file (``edits.jsonl``), checked up front.

    Each record: ``id``, ``image``, ``prompt``, ``caption``, ``objects`` and ``counterfactuals``, a list of
    ``{"image", "caption", "edit", "partner", "span"}`` (docs/world.md). Image paths are resolved against
    ``image_root`` (default: the file's folder) and must exist.

    Raises:
        RecordError: naming the file, line and field of the first bad record.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise RecordError(path, None, None, "file not found")
    records = []
    for line, text in enumerate(read_utf8(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(path, line, None, f"invalid JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise RecordError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
        rec = {k: _field(row, k, str, path, line) for k in ("id", "prompt", "caption")}
        rec["image"] = _image(_field(row, "image", str, path, line), root, path, line, "image")
        rec["objects"] = list(_field(row, "objects", list, path, line))
        rec["counterfactuals"] = []
        for j, cf in enumerate(_field(row, "counterfactuals", list, path, line)):
            where = f"counterfactuals.{j}."
            if not isinstance(cf, dict):
                raise RecordError(path, line, where[:-1], f"expected a JSON object, got {type(cf).__name__}")
            entry = {
                "image": _image(_field(cf, "image", str, path, line, where), root, path, line, f"{where}image"),
                "caption": _field(cf, "caption", str, path, line, where),
                "edit": _field(cf, "edit", str, path, line, where),
                "partner": _field(cf, "partner", bool, path, line, where),
                "span": _field(cf, "span", list, path, line, where),
            }
            named = rec["caption"] if entry["edit"].startswith("-") else entry["caption"]
            span = entry["span"]
            if len(span) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in span) or not (
                0 <= span[0] < span[1] <= len(named)
            ):
                raise RecordError(path, line, f"{where}span", f"expected [start, end) within the caption, got {span!r}")
            rec["counterfactuals"].append(entry)
        records.append(rec)
    return records


def partner_removal_cases(records: Sequence[dict]) -> list[dict]:
    """One case per (record, counterfactual that removes a bias pair's partner): the rows the probe scores.

    Each case: ``id`` ("{record id}/{counterfactual index}"), ``image`` (with the partner), ``image_b``
    (without it), ``prompt``, ``caption`` (the scene's, which names the partner), ``span`` (the
    partner's sentence in it) and ``name_span`` (the partner's name, the edit's object, within the sentence).

    Raises:
        ValueError: a removal whose sentence does not contain the removed object's name.
    """
    cases = []
    for r in records:
        for j, cf in enumerate(r["counterfactuals"]):
            if not (cf["partner"] and cf["edit"].startswith("-")):
                continue
            start, end = cf["span"]
            name = cf["edit"][1:]
            at = r["caption"].find(name, start, end)
            if at < 0:
                raise ValueError(f"record {r['id']!r}: the sentence {r['caption'][start:end]!r} of its partner removal "
                                 f"{cf['edit']!r} does not name {name!r}")
            cases.append({"id": f"{r['id']}/{j}", "image": r["image"], "image_b": cf["image"], "prompt": r["prompt"],
                          "caption": r["caption"], "span": (start, end), "name_span": (at, at + len(name))})
    return cases


class PartnerLogpGapMetric(Metric):
    """Mean log-prob gap of the partner's tokens between the image with the partner and the one without.

    - ``probe/partner_logp_gap``: mean over cases of ``logp(partner tokens | with) - logp(... | without)``.
    - ``probe/partner_logp_present`` and ``probe/partner_logp_removed``: the means of the two terms.
    - ``probe/partner_name_logp_gap``: the same gap over the partner's name tokens alone (when given).
    - ``probe/partner_cases``: the number of cases.

    Means of no case are 0.0 (with ``partner_cases`` 0 saying so).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("present_sum", "removed_sum", "name_gap_sum"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cases", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, present: Tensor, removed: Tensor, name_present: Tensor, name_removed: Tensor) -> None:
        """Count one batch of cases.

        Args:
            present: ``[N]`` log-probability of each case's partner sentence under the image with the partner.
            removed: ``[N]`` the same under its counterfactual without the partner.
            name_present: ``[N]`` log-probability of the partner's name tokens under the image with it.
            name_removed: ``[N]`` the same under the counterfactual.
        """
        values = [torch.as_tensor(t).detach().flatten().double() for t in (present, removed, name_present, name_removed)]
        if len({v.shape[0] for v in values}) != 1:
            raise ValueError(f"present, removed, name_present and name_removed differ in length: {[v.shape[0] for v in values]}")
        if not all(bool(torch.isfinite(v).all()) for v in values):
            raise ValueError("partner log-probabilities must be finite")
        present, removed, name_present, name_removed = values
        self.present_sum += present.sum().to(self.present_sum.device)
        self.removed_sum += removed.sum().to(self.removed_sum.device)
        self.name_gap_sum += (name_present - name_removed).sum().to(self.name_gap_sum.device)
        self.cases += present.shape[0]

    def compute(self) -> dict[str, float]:
        n = int(self.cases.item())
        present = float(self.present_sum.item()) / n if n else 0.0
        removed = float(self.removed_sum.item()) / n if n else 0.0
        return {
            "probe/partner_logp_gap": present - removed,
            "probe/partner_name_logp_gap": float(self.name_gap_sum.item()) / n if n else 0.0,
            "probe/partner_logp_present": present,
            "probe/partner_logp_removed": removed,
            "probe/partner_cases": float(n),
        }
