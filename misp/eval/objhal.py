"""Object HalBench (Rohrbach et al. 2018 / RLHF-V, Yu et al. 2024): CHAIR on detailed descriptions of
300 COCO val2014 images.

Files: the question file of RLHF-V's Object HalBench (JSON Lines, one record per image with
``image_id`` (the COCO id) and ``question``, the detailed-description instruction; an ``image`` field
naming a file is used as the image's name) saved as ``<data_root>/objhal/objhal_questions.jsonl``; the
COCO images in ``<data_root>/objhal/val2014/`` (``COCO_val2014_<id:012d>.jpg`` unless ``image`` says
otherwise); the user's COCO 2014 annotations in ``<data_root>/objhal/annotations/``:
``instances_val2014.json`` and ``captions_val2014.json`` (and the ``train2014`` ones if present, which
CHAIR also reads).

Scoring is CHAIR (``utils/chair.py`` of LisaAnne/Hallucination, which RLHF-V's script builds on): an
image's objects are its instance categories plus the categories its five reference captions name; a
response's mentions are found by :class:`misp.eval.coco.CocoObjects` with the shipped synonym table;
``CHAIR_i`` = mentions not among the image's objects / mentions; ``CHAIR_s`` = responses with one or
more / responses; ``recall`` = image objects named / image objects. RLHF-V's optional GPT object
extraction in front of the matching is not used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchmetrics import Metric
from tqdm.auto import tqdm

from misp.data.records import RecordError, read_utf8
from misp.eval.benchmark import Benchmark, Question, check_images, ratio, require_file, warn_unreadable
from misp.eval.coco import CocoObjects

QUESTION_FILE = "objhal_questions.jsonl"
"""The question file's name under ``<data_root>/objhal/``."""


def coco_objects(annotations: Path, image_ids: set[int], coco: CocoObjects) -> dict[int, set[str]]:
    """Each image's COCO categories from its instances and its reference captions (CHAIR's truth)."""
    objects: dict[int, set[str]] = {i: set() for i in image_ids}
    found = False
    for split in ("val2014", "train2014"):
        inst, caps = annotations / f"instances_{split}.json", annotations / f"captions_{split}.json"
        if not inst.is_file() and not caps.is_file():
            continue
        for path in (inst, caps):
            require_file(path, f"COCO {path.name} (CHAIR reads instances and captions together)")
        found = True
        data = json.loads(read_utf8(inst))
        names = {c["id"]: c["name"] for c in data["categories"]}
        for a in tqdm(data["annotations"], desc=f"COCO {inst.name}", leave=False):
            if a["image_id"] in objects:
                objects[a["image_id"]].add(coco.category[names[a["category_id"]]])
        for a in json.loads(read_utf8(caps))["annotations"]:
            if a["image_id"] in objects:
                objects[a["image_id"]].update(coco.words(a["caption"]))
    if not found:
        raise RecordError(annotations, None, None, "holds no COCO instances_val2014.json / captions_val2014.json")
    return objects


class ObjectHalBench(Benchmark):
    """Object HalBench: CHAIR_s and CHAIR_i of detailed descriptions."""

    name = "objhal"
    max_new_tokens = 512

    def questions(self) -> list[Question]:
        path = require_file(self.root / QUESTION_FILE, f"Object HalBench question file {QUESTION_FILE}")
        self.source = path
        rows = []
        for line, text in enumerate(read_utf8(path).splitlines(), 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError(path, line, None, f"not valid JSON: {e.msg}") from None
            for key in ("image_id", "question"):
                if key not in row:
                    raise RecordError(path, line, key, "missing")
            try:
                image_id = int(row["image_id"])
            except (TypeError, ValueError):
                raise RecordError(path, line, "image_id", f"must be a COCO image id, got {row['image_id']!r}") from None
            name = row.get("image") if isinstance(row.get("image"), str) and len(row["image"]) < 256 else None
            rows.append((line, image_id, name or f"COCO_val2014_{image_id:012d}.jpg", str(row["question"])))
        rows = rows[: self.limit] if self.limit is not None else rows
        self.coco = CocoObjects()
        truth = coco_objects(self.root / "annotations", {r[1] for r in rows}, self.coco)
        out, seen = [], set()
        for line, image_id, name, question in rows:
            if image_id in seen:
                raise RecordError(path, line, "image_id", f"{image_id} is asked about twice (one question per image)")
            seen.add(image_id)
            if not truth[image_id]:
                raise RecordError(path, line, "image_id", f"{image_id} has no objects in the COCO annotations")
            out.append(Question(str(image_id), self.root / "val2014" / name, question,
                                {"objects": sorted(truth[image_id])}))
        check_images(out, path)
        return out

    def judge(self, question: Question, answer: str) -> dict:
        if not answer.strip():
            warn_unreadable(self.source, question.id, answer, "a description (it is empty)")
        coco = getattr(self, "coco", None) or CocoObjects()
        mentions = coco.words(answer)
        truth = set(question.meta["objects"])
        return {"mentions": mentions, "hallucinated": [m for m in mentions if m not in truth],
                "covered": sorted(truth & set(mentions)), "objects": len(truth), "readable": bool(answer.strip())}

    def metric(self) -> ObjHalMetric:
        return ObjHalMetric()


_COUNTS = ("responses", "hallucinated_responses", "mentions", "hallucinated", "objects", "covered", "empty")


class ObjHalMetric(Metric):
    """CHAIR_s, CHAIR_i and object recall from judgements (integer counts, summed across ranks)."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("counts", default=torch.zeros(len(_COUNTS), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, judgements: list[dict]) -> None:
        for j in judgements:
            self.counts += torch.tensor([1, int(bool(j["hallucinated"])), len(j["mentions"]), len(j["hallucinated"]),
                                         j["objects"], len(j["covered"]), int(not j["readable"])])

    def compute(self) -> dict[str, float]:
        c = dict(zip(_COUNTS, self.counts.tolist(), strict=True))
        return {
            "objhal/CHAIR_s": ratio(c["hallucinated_responses"], c["responses"]),
            "objhal/CHAIR_i": ratio(c["hallucinated"], c["mentions"]),
            "objhal/recall": ratio(c["covered"], c["objects"]),
            "objhal/responses": float(c["responses"]),
            "objhal/unreadable": float(c["empty"]),
        }
