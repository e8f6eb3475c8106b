"""The hand-off of a ``misp export --merge`` folder to lmms-eval (docs/evaluation.md, examples/lmms_eval_handoff.sh).

lmms-eval is not a misp dependency and lives in its own virtualenv, so the end-to-end test runs only where
``LMMS_EVAL_PYTHON`` names that virtualenv's Python (see docs/evaluation.md for how it was built):

    LMMS_EVAL_PYTHON=/tmp/lmms-venv/bin/python pytest -q tests/eval/test_lmms_eval_handoff.py

The parquet the task reads is checked everywhere, with misp's own ``datasets``."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "examples" / "lmms_eval_handoff.sh"
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # lmms-eval's POPE prompt suffix


def _prepare_module():
    spec = importlib.util.spec_from_file_location("lmms_eval_prepare", ROOT / "examples" / "lmms_eval_prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_pope_parquet_reads_as_lmms_lab_pope_does(tmp_path):
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    _prepare_module().write_pope_parquet(tmp_path / "test.parquet", n=6)
    ds = load_dataset("parquet", data_files={"test": str(tmp_path / "test.parquet")},
                      cache_dir=str(tmp_path / "cache"))["test"]
    assert {"question_id", "question", "answer", "image", "category"} <= set(ds.column_names)
    assert isinstance(ds.features["image"], ImageFeature)  # lmms-eval's pope_doc_to_visual calls .convert
    assert ds[0]["image"].size == (64, 64)
    assert [r["answer"] for r in ds] == ["no", "yes"] * 3
    assert ds[2]["question"] == "Is there a person in the image?"


def _lmms_python() -> str:
    python = os.environ.get("LMMS_EVAL_PYTHON")
    if not python:
        pytest.skip("LMMS_EVAL_PYTHON is not set (the Python of a virtualenv with lmms-eval)")
    return python


def _greedy(model, processor, image, question: str) -> str:
    """What lmms-eval's llava_hf chat model sends and decodes: the processor's chat template with the image
    first, greedy, 128 new tokens (POPE's), the tokenizer's EOS as stop and pad token."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + POST_PROMPT}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[image.convert("RGB")], text=text, return_tensors="pt")
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=128, pad_token_id=eos, eos_token_id=eos)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)


def _handoff(tmp_path: Path, family: str) -> tuple[Path, list[dict]]:
    """Run examples/lmms_eval_handoff.sh for ``family`` on 4 questions; its folder and lmms-eval's samples,
    after checking that lmms-eval's aggregate is the mean of its per-sample scores."""
    lmms_python = _lmms_python()
    work = tmp_path / "handoff"
    env = {**os.environ, "MISP_PYTHON": sys.executable, "LMMS_EVAL_PYTHON": lmms_python,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["bash", str(SCRIPT), str(work), family, "4"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "misp_pope_local" in proc.stdout  # lmms-eval's results table

    samples_file, = (work / "lmms-eval").glob("*/*_samples_misp_pope_local.jsonl")
    results_file, = (work / "lmms-eval").glob("*/*_results.json")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
    results = json.loads(results_file.read_text())["results"]["misp_pope_local"]
    scores = [s["pope_accuracy"]["score"] for s in samples]
    assert results["pope_accuracy,none"] == pytest.approx(sum(scores) / len(scores))
    # lmms-eval logs a failed generation as an empty answer and goes on: none may be empty
    assert all(s["filtered_resps"].strip() for s in samples)
    return work, samples


def test_lmms_eval_runs_a_merged_qwen25vl_export(tmp_path):
    _handoff(tmp_path, "qwen25vl")


def test_lmms_eval_answers_with_the_merged_llava15_export(tmp_path):
    from datasets import load_dataset
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    work, samples = _handoff(tmp_path, "llava15")

    # lmms-eval generated with the merged weights: its answers are plain transformers' greedy answers on
    # the merged folder, and not the untrained base's.
    ds = load_dataset("parquet", data_files={"test": str(work / "pope" / "test.parquet")},
                      cache_dir=str(tmp_path / "cache"))["test"]
    processor = AutoProcessor.from_pretrained(work / "merged")
    merged = LlavaForConditionalGeneration.from_pretrained(work / "merged").eval()
    base = LlavaForConditionalGeneration.from_pretrained(work / "base").eval()
    differs = False
    for s in samples:
        doc = ds[s["doc_id"]]
        want = _greedy(merged, processor, doc["image"], doc["question"])
        assert s["filtered_resps"] == want, s["doc_id"]
        differs |= _greedy(base, processor, doc["image"], doc["question"]) != want
    assert differs
