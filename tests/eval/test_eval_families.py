"""``misp eval`` on every model family misp supports besides LLaVA-1.5 (tests/eval/test_eval_cli_llava15.py):
the tiny random-weight models in their hub layout answer POPE through their own chat template and image
path, every answer is kept, and the scores are the generations' own."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from misp.cli import main
from misp.testing.gemma3 import build_gemma3, save_gemma3_hub_files
from misp.testing.qwen3vl import build_qwen3vl, save_qwen3vl_hub_files
from misp.testing.qwen25vl import build_qwen25vl, save_qwen25vl_hub_files

N_POPE = 6
FAMILIES = {
    "qwen2.5-vl": (build_qwen25vl, save_qwen25vl_hub_files),
    "qwen3-vl": (build_qwen3vl, save_qwen3vl_hub_files),
    "gemma-3": (build_gemma3, save_gemma3_hub_files),
}


@pytest.fixture(scope="module")
def pope_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pope")
    pope = root / "pope"
    (pope / "val2014").mkdir(parents=True)
    # Two sizes: the dynamic-resolution families give them different token counts in one batch.
    for i, size in enumerate([(64, 64), (96, 64)]):
        Image.new("RGB", size, (90 * i, 40, 160)).save(pope / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    with open(pope / "coco_pope_random.json", "w") as f:
        for q in range(N_POPE):
            f.write(json.dumps({"question_id": q + 1, "image": f"COCO_val2014_{q % 2:012d}.jpg",
                                "text": f"Is there a {['dog', 'cat', 'bus'][q % 3]} in the image?",
                                "label": "yes" if q % 2 else "no"}) + "\n")
    return root


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_misp_eval_answers_pope_with_every_family(family, pope_root, tmp_path):
    build, save = FAMILIES[family]
    model, processor = build()
    save(model, processor, tmp_path / "model")
    out = tmp_path / "run"
    main(["eval", "--model", str(tmp_path / "model"), "--benchmarks", "pope", "--data_root", str(pope_root),
          "--out", str(out), "--dtype", "float32", "--device", "cpu", "--batch_size", "4", "--max_new_tokens", "3",
          "--quiet", "true"])
    records = [json.loads(line) for line in (out / "generations" / "pope.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records}) and len(records) == N_POPE
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["pope/random/questions"] == N_POPE
    judged = [r["judgement"] for r in records if r["judgement"]["pred"] is not None]
    right = sum(j["pred"] == j["truth"] for j in judged)
    assert results["pope/random/accuracy"] == pytest.approx(right / N_POPE)
