"""Evaluation data shared by every VLM module: POPE questions, captioning prompts for CHAIR, Shapes-MMVP
pairs and likelihood-grounding captions."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from misp.data.records import (
    ReadResult,
    RecordError,
    read_grounding_records,
    read_mmvp_pairs,
    read_pope_questions,
    read_prompt_records,
)
from misp.eval.grounding import ATTRIBUTES
from misp.eval.partner_probe import partner_removal_cases, read_edit_records
from misp.images import load_rgb
from misp.world.config import EVAL_SPLITS
from misp.world.generate import EDITS_KIND, eval_file_key, read_manifest

log = logging.getLogger(__name__)


@dataclass
class EvalData:
    """Where the evaluation questions and prompts come from: POPE questions, captioning prompts (CHAIR and
    co-occurrence), Shapes-MMVP pairs and likelihood-grounding captions."""

    pope_file: str | None = None
    """POPE questions, JSON Lines (``image``, ``question``, ``label``, ``split``); None skips POPE."""
    pope_layout: str = "misp"
    """``misp`` (the layout above) or ``pope`` (the original POPE files: ``question_id``, ``image``,
    ``text``, ``label``; the split is then ``pope_split``)."""
    pope_split: str | None = None
    """Split name for a ``pope``-layout file (random, popular or adversarial)."""
    captions_file: str | None = None
    """Captioning prompts with ground-truth objects (``image``, ``prompt``, ``objects``); None skips CHAIR."""
    mmvp_file: str | None = None
    """Shapes-MMVP pairs, JSON Lines (``image_a``, ``image_b``, ``question``, ``answer_a``, ``answer_b``,
    ``attribute``): pair accuracy, a pair counting only when both answers are right
    (``misp.eval.grounding``). None: the MMVP file of the captions file's split in a ``world.json`` beside
    it (mmvp.jsonl for test.jsonl, val_mmvp.jsonl for val.jsonl), if there is one and it holds pairs;
    "": off."""
    grounding_file: str | None = None
    """Captions with one-attribute counterfactual images, JSON Lines (``image``, ``prompt``, ``caption``,
    ``counterfactuals``, ``attributes``): the share of captions more likely under their own image than
    under every counterfactual, per attribute. None: the grounding file of the captions file's split in a
    ``world.json`` beside it (grounding.jsonl for test.jsonl, val_grounding.jsonl for val.jsonl), if there
    is one and it holds records; "": off."""
    edits_file: str | None = None
    """A world's partner scenes with their captioned object edits, JSON Lines (``image``, ``prompt``,
    ``caption``, ``objects``, ``counterfactuals``: docs/world.md): their captions add present-partner
    cases to ``cooccurrence/partner_present_rate``, and their partner removals give the partner-token
    probe ``probe/partner_logp_gap`` (``misp.eval.partner_probe``). None: the edits file of the captions
    file's split in a ``world.json`` beside it (edits.jsonl for test.jsonl, val_edits.jsonl for val.jsonl),
    if the world has one (format 6 with ``partner_scenes``); "": off."""
    image_root: str | None = None
    """Folder image paths are relative to (default: each file's folder)."""
    objects: list[str] = field(default_factory=list)
    """CHAIR's object vocabulary. Empty: read ``objects`` from a ``world.json`` beside the captions file."""
    synonyms_file: str | None = None
    """Optional JSON object mapping a surface form to its canonical object name (for CHAIR)."""
    cooccurrence_pairs: list[str] | None = None
    """'TRIGGER -> PARTNER' object pairs whose co-occurrence hallucination is measured beside CHAIR
    (``misp.eval.cooccurrence``). None: the bias pairs of a ``world.json`` beside the captions file, if
    there is one; []: off."""
    limit: int | None = None
    """Evaluate only the first N questions of each POPE split, the first N prompts, MMVP pairs and
    grounding captions (quick validation during training)."""
    batch_size: int = 32
    """Prompts per generation batch."""

    def _world(self) -> dict | None:
        """The Shapes-world manifest beside the captions file, if there is one."""
        if self.captions_file is None:
            return None
        path = Path(self.captions_file).parent / "world.json"
        # A world of another format version is refused here too, not used with its old objects and pairs.
        return read_manifest(path) if path.exists() else None

    def chair_objects(self) -> list[str]:
        if self.objects:
            return list(self.objects)
        if self.captions_file is None:
            return []
        world = self._world()
        if world is None:
            raise FileNotFoundError(
                f"CHAIR needs an object vocabulary: set evaluation.objects, or put a world.json beside {self.captions_file}"
            )
        return list(world["objects"])

    def pairs(self) -> list[str]:
        """The co-occurrence pairs to measure (see ``cooccurrence_pairs``)."""
        if self.cooccurrence_pairs is not None:
            return list(self.cooccurrence_pairs)
        world = self._world()
        if world is None:
            return []
        return [f"{p['trigger']} -> {p['partner']}" for p in world.get("bias_pairs", [])]

    def _world_file(self, explicit: str | None, kind: str) -> str | None:
        """``explicit`` if set ("" is off), else the world's ``kind`` file (mmvp or grounding) of the split
        the captions file belongs to, or None.

        The split is the manifest entry whose ``path`` is the captions file's name (test.jsonl: test,
        val.jsonl: val); its companion is that split's ``kind`` file (``eval_file_key``). A captions file
        that is no evaluation split's of the world gets none: guessing test's would let validation on val
        score test's pairs.
        """
        if explicit is not None:
            return explicit or None
        if self.captions_file is None:  # no captions (POPE only, as on real data): no world to look in
            return None
        files = (self._world() or {}).get("files", {})
        name = Path(self.captions_file).name
        split = next((key for key in EVAL_SPLITS if files.get(key, {}).get("path") == name), None)
        entry = files.get(eval_file_key(split, kind)) if split is not None else None
        if not entry or not entry.get("rows"):
            return None
        return str(Path(self.captions_file).parent / entry["path"])

    def mmvp_path(self) -> str | None:
        """The Shapes-MMVP pairs to evaluate, or None (see ``mmvp_file``)."""
        return self._world_file(self.mmvp_file, "mmvp")

    def grounding_path(self) -> str | None:
        """The likelihood-grounding records to score, or None (see ``grounding_file``)."""
        return self._world_file(self.grounding_file, "grounding")

    def edits_path(self) -> str | None:
        """The partner scenes' edits file to evaluate, or None (see ``edits_file``)."""
        return self._world_file(self.edits_file, EDITS_KIND)

    def synonyms(self) -> dict[str, str]:
        if self.synonyms_file is None:
            return {}
        return dict(json.loads(Path(self.synonyms_file).read_text()))


class _EvalDataset(Dataset):
    def __init__(self, task: str, rows: list[dict]) -> None:
        self.task = task
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.rows[i])
        for key in ("image", "image_b"):
            if key in row:
                row[key] = load_rgb(row[key])
        if "counterfactuals" in row:
            row["counterfactuals"] = [load_rgb(p) for p in row["counterfactuals"]]
        return row


def _collate(items: list[dict]) -> dict:
    batch = {key: [item[key] for item in items] for key in items[0]}
    batch["task"] = items[0]["task"]
    return batch


def _first_per_split(questions: list, limit: int | None) -> list:
    # POPE files list one split after another; a plain [:limit] would validate on the first split only.
    if limit is None:
        return questions
    taken: dict[str, int] = {}
    kept = []
    for q in questions:
        if taken.get(q.split, 0) < limit:
            taken[q.split] = taken.get(q.split, 0) + 1
            kept.append(q)
    return kept


def _check_attributes(read: ReadResult, field: str) -> list:
    """Refuse, at start-up and naming file:line, an attribute the grounding metrics do not count."""
    for record, line in zip(read.records, read.lines, strict=True):
        values = getattr(record, field)
        for value in (values,) if isinstance(values, str) else values:
            if value not in ATTRIBUTES:
                raise RecordError(read.path, line, field, f"unknown attribute {value!r}; known: {list(ATTRIBUTES)}")
    return read.records


def eval_datasets(cfg: EvalData) -> list[_EvalDataset]:
    """The POPE, captioning, MMVP, grounding and partner-scene sets named by ``cfg``, validated up front, in
    that order."""
    sets = []
    if cfg.pope_file:
        questions = _first_per_split(read_pope_questions(
            Path(cfg.pope_file), image_root=cfg.image_root, layout=cfg.pope_layout, split=cfg.pope_split
        ).records, cfg.limit)
        rows = [
            {"task": "pope", "id": q.id, "image": q.image, "prompt": q.question, "label": q.label, "split": q.split}
            for q in questions
        ]
        sets.append(_EvalDataset("pope", rows))
    if cfg.captions_file:
        prompts = read_prompt_records(Path(cfg.captions_file), image_root=cfg.image_root).records[: cfg.limit]
        rows = [
            {"task": "caption", "id": p.id, "image": p.image, "prompt": p.prompt, "objects": list(p.objects)}
            for p in prompts
        ]
        sets.append(_EvalDataset("caption", rows))
    if mmvp := cfg.mmvp_path():
        read = read_mmvp_pairs(Path(mmvp), image_root=cfg.image_root)
        pairs = _check_attributes(read, "attribute")[: cfg.limit]
        rows = [
            {
                "task": "mmvp", "id": p.id, "image": p.image_a, "image_b": p.image_b, "prompt": p.question,
                "answer_a": p.answer_a, "answer_b": p.answer_b, "attribute": p.attribute,
            }
            for p in pairs
        ]
        sets.append(_EvalDataset("mmvp", rows))
    if grounding := cfg.grounding_path():
        read = read_grounding_records(Path(grounding), image_root=cfg.image_root)
        records = _check_attributes(read, "attributes")[: cfg.limit]
        rows = [
            {
                "task": "likelihood", "id": r.id, "image": r.image, "prompt": r.prompt, "caption": r.caption,
                "counterfactuals": list(r.counterfactuals), "attributes": list(r.attributes),
            }
            for r in records
        ]
        sets.append(_EvalDataset("likelihood", rows))
    if edits := cfg.edits_path():
        records = read_edit_records(Path(edits), image_root=cfg.image_root)[: cfg.limit]
        rows = [{"task": "partner_caption", "id": r["id"], "image": r["image"], "prompt": r["prompt"],
                 "objects": r["objects"]} for r in records]
        sets.append(_EvalDataset("partner_caption", rows))
        cases = [{"task": "partner_logp", **case} for case in partner_removal_cases(records)]
        if cases:
            sets.append(_EvalDataset("partner_logp", cases))
    elif cfg.captions_file and cfg.edits_file is None and cfg._world() is not None:
        log.info("probe/partner_logp_gap skipped: the world beside %s has no partner scenes with partner-removed "
                 "counterfactuals (generate it with partner_scenes > 0, e.g. configs/worlds/shapes_edits.yaml)",
                 cfg.captions_file)
    return sets


def eval_dataloaders(cfg: EvalData, num_workers: int = 0) -> list[DataLoader]:
    return [
        DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
        for ds in eval_datasets(cfg)
    ]
