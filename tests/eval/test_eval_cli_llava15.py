"""``misp eval`` and ``misp export`` end to end on the tiny real-architecture LLaVA-1.5
(misp/models/llava15.py): a resume after a kill, and a merged export that plain transformers loads
with the log-probabilities of adapter + base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from misp.cli import main
from misp.eval.scoring import response_logps_per_image
from misp.models.llava15 import Llava15Sizes, build_llava15, save_hub_files
from misp.testing.lora_checkpoint import write_lora_checkpoint

N_POPE = 24


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalcli")
    model, processor = build_llava15(Llava15Sizes(image_size=56))
    save_hub_files(model, processor, root / "base")
    pope = root / "data" / "pope"
    (pope / "val2014").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 20, 200 - 40 * i)).save(pope / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    objects = ["dog", "cat", "person", "car", "bus", "cow"]
    with open(pope / "coco_pope_random.json", "w") as f:
        for q in range(N_POPE):
            f.write(json.dumps({"question_id": q + 1, "image": f"COCO_val2014_{q % 4:012d}.jpg",
                                "text": f"Is there a {objects[q % 6]} in the image?",
                                "label": "yes" if q % 2 else "no"}) + "\n")
    return root


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def test_misp_eval_resumes_after_a_kill_without_answering_twice(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--model", str(workspace / "base"), "--benchmarks", "pope", "--data_root",
            str(workspace / "data"), "--out", str(out), "--dtype", "float32", "--device", "cpu",
            "--batch_size", "1", "--max_new_tokens", "3", "--quiet", "true"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "misp.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    generations = out / "generations" / "pope.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if generations.is_file() and len(generations.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"misp eval ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    before = generations.read_text().splitlines()
    answered = [json.loads(line)["id"] for line in before if line.endswith("}")]
    assert 3 <= len(answered) < N_POPE
    with open(generations, "a") as f:
        f.write('{"id": "random/99", "prompt": "cut sh')  # a write the kill cut in half

    main(args)  # the same command again: resumes

    ids = _ids(generations)
    assert len(ids) == len(set(ids)) == N_POPE  # every question answered, none twice
    assert ids[: len(answered)] == answered  # the answers from before the kill are kept as they were
    records = [json.loads(line) for line in generations.read_text().splitlines()]
    assert all(set(r) == {"id", "prompt", "answer", "judgement"} for r in records)
    assert all(r["prompt"].endswith("Answer the question using a single word or phrase.") for r in records)
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["pope/random/questions"] == N_POPE
    judged = [r["judgement"] for r in records]
    right = sum(j["pred"] == j["truth"] for j in judged)
    assert results["pope/random/accuracy"] == pytest.approx(right / N_POPE)
    printed = capsys.readouterr().out
    assert "POPE acc" in printed and "POPE F1" in printed


def _checkpoint(workspace: Path, path: Path) -> torch.nn.Module:
    """A checkpoint as a misp preference run writes it: the LoRA weights and the run's settings."""
    return write_lora_checkpoint(workspace / "base", path)


def test_export_merge_gives_the_log_probs_of_adapter_plus_base(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ckpt = tmp_path / "last.ckpt"
    trained = _checkpoint(workspace, ckpt)
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "merged"), "--merge", "true"])
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "adapter")])

    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    base = LlavaForConditionalGeneration.from_pretrained(workspace / "base").eval()
    adapter = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(workspace / "base"),
                                        tmp_path / "adapter").eval()
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    items = [("Is there a dog in the image?", "Yes, there is a dog.", [image]),
             ("Describe the image.", "A red square on a plain background.", [image])]
    got = torch.cat(response_logps_per_image(merged, processor, items))
    want = torch.cat(response_logps_per_image(adapter, processor, items))
    live = torch.cat(response_logps_per_image(trained, processor, items))
    untrained = torch.cat(response_logps_per_image(base, processor, items))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, live, atol=1e-4, rtol=1e-5)
    assert (got - untrained).abs().max() > 1e-2  # the adapter's weights made it into the merge

    for folder, form in (("merged", "merged weights"), ("adapter", "LoRA adapter")):
        card = (tmp_path / folder / "README.md").read_text()
        for text in ("TextDPO", "| beta | 0.1 |", "| K (negatives per record) | 4 |", "| negative source | sae |",
                     "data/prefs.jsonl", str(workspace / "base"), "misp version", form):
            assert text in card, (folder, text)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "merged" / "adapter").exists()


def test_eval_puts_the_base_and_its_exported_adapter_side_by_side(workspace, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    _checkpoint(workspace, ckpt)
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "adapter")])
    common = ["--benchmarks", "pope", "--data_root", str(workspace / "data"), "--limit", "2",
              "--max_new_tokens", "2", "--dtype", "float32", "--device", "cpu", "--quiet", "true"]
    main(["eval", "--model", str(workspace / "base"), "--out", str(tmp_path / "base"), *common])
    capsys.readouterr()
    main(["eval", "--model", str(workspace / "base"), "--adapter", str(tmp_path / "adapter"),
          "--out", str(tmp_path / "misp"), "--compare", str(tmp_path / "base"), *common])
    table = capsys.readouterr().out.split("model ", 1)[1].splitlines()
    assert table[1].split()[0] == "base" and table[2].split()[0] == "misp"
    saved = json.loads((tmp_path / "misp" / "results.json").read_text())
    assert saved["adapter"] == str(tmp_path / "adapter") and saved["results"]["pope/random/questions"] == 2


def test_push_to_hub_creates_the_repo_and_uploads_the_folder(tmp_path):
    from misp.export import push_to_hub

    class Api:
        calls: list = []

        def create_repo(self, **kwargs):
            self.calls.append(("create_repo", kwargs))

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs))
            return type("Info", (), {"commit_url": "https://hub.local/me/m/commit/1"})()

    (tmp_path / "README.md").write_text("card")
    api = Api()
    assert push_to_hub(tmp_path, "me/m", api=api) == "https://hub.local/me/m/commit/1"
    assert api.calls[0] == ("create_repo", {"repo_id": "me/m", "private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[1][1]["folder_path"] == str(tmp_path) and api.calls[1][1]["repo_id"] == "me/m"


def test_export_of_a_foreign_checkpoint_is_one_clear_error(tmp_path, capsys):
    torch.save({"pytorch-lightning_version": "2.5.0", "state_dict": {}, "hyper_parameters": {"lr": 1.0}},
               tmp_path / "x.ckpt")
    with pytest.raises(SystemExit) as e:
        main(["export", "--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "hold no 'vlm' settings" in capsys.readouterr().err
