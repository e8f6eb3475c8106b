"""Issue 25 (reliability, round 3): each fault through misp's public entry points, at smoke size."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from misp.cli import main
from misp.demo import method_configs

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- safe reading of every checkpoint format --------------------------------------------------------------
class _Payload:
    """Unpickling this calls os.system: what a crafted checkpoint file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_sharded_metadata_pickle_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder = tmp_path / "epoch=0-step=2.ckpt"
    folder.mkdir()
    torch.save({"pytorch-lightning_version": "2.6"}, folder / "meta.pt")
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    err = _cli_error(["test", *method_configs("dpo", ROOT), "--ckpt_path", str(folder)], capsys)
    assert f"misp: error: checkpoint {folder / '.metadata'}: refused" in err and "posix.system" in err, err
    assert not marker.exists()


def test_a_real_sharded_checkpoint_reads_through_the_restricted_unpickler(tmp_path):
    import torch.distributed.checkpoint as dcp

    from misp.checkpoints import read_checkpoint, read_dcp_metadata, safe_file_system_reader
    from misp.training.fsdp import saved_model_keys

    folder = tmp_path / "sharded.ckpt"
    state = {"model.w": torch.randn(3, 4, dtype=torch.bfloat16), "model.b": torch.arange(5.0)}
    dcp.save(state, checkpoint_id=folder)
    torch.save({"pytorch-lightning_version": "2.6", "global_step": 7}, folder / "meta.pt")
    assert set(read_dcp_metadata(folder).state_dict_metadata) == {"model.w", "model.b"}
    assert saved_model_keys(folder) == {"w", "b"}
    assert read_checkpoint(folder)["global_step"] == 7
    loaded = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(loaded, storage_reader=safe_file_system_reader(folder))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# --- interruption: a non-zero exit; children forwarded the signal and reaped; nothing unfinished recorded -----
def _env() -> dict:
    return os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1",
                         "MISP_LOG_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _dpo_fit_args(world: Path, vlm: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", *method_configs("dpo", ROOT), f"--model.init_args.vlm.path={vlm}", "--model.init_args.export_dir=null",
        f"--data.records_file={world / 'pref.jsonl'}", f"--data.evaluation.pope_file={world / 'pope.jsonl'}",
        f"--data.evaluation.captions_file={world / 'test.jsonl'}",
        f"--data.validation.pope_file={world / 'val_pope.jsonl'}",
        f"--data.validation.captions_file={world / 'val.jsonl'}", f"--trainer.default_root_dir={root}",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.batch_size=4", "--data.progress=false", "--data.preview_records=0", *extra,
    ]


def test_sigterm_during_misp_fit_is_a_nonzero_exit_and_not_a_finished_fit(tiny_world, vlm_dir, tmp_path):
    import subprocess
    import sys

    from misp.callbacks import FIT_DONE

    root = tmp_path / "run"
    args = _dpo_fit_args(tiny_world, vlm_dir, root, "--trainer.max_steps=6",
                         "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                         f"--trainer.callbacks.dirpath={root / 'checkpoints'}", "--trainer.callbacks.save_last=true",
                         "--trainer.callbacks.every_n_train_steps=1",
                         "--trainer.callbacks+=fault_helpers.TermAt", "--trainer.callbacks.step=2")
    killed = subprocess.run([sys.executable, "-m", "misp.cli", *args], cwd=tmp_path, env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 128 + 15, killed.stderr[-3000:]
    assert "misp: interrupted by SIGTERM: the run did not finish" in killed.stderr
    assert not (root / FIT_DONE).exists()  # what misp experiment records a fit by
    from misp.checkpoints import read_checkpoint

    assert read_checkpoint(root / "checkpoints/last.ckpt")["global_step"] == 2  # resumable from its last step


def test_sigterm_to_misp_experiment_is_forwarded_to_its_child_which_is_reaped(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    ws = tmp_path / "ws"
    # A world big enough that its stage (the chain's first child) is still running when the signal comes.
    (tmp_path / "world.yaml").write_text("n_clip: 200000\nn_sft: 20000\n")
    args = ["experiment", "--workspace", str(ws), "--world", str(tmp_path / "world.yaml"),
            "--configs", str(ROOT / "configs/shapes"), "--methods", '[{"name": "dpo", "method": "dpo"}]',
            "--main", "dpo", "--grid", '{"model.init_args.lr": [0.0001]}', "--seeds", "[0]",
            "--report", str(tmp_path / "report.md")]
    proc = subprocess.Popen([sys.executable, "-m", "misp.cli", *args], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children: list[int] = []
    deadline = time.monotonic() + 240
    while not children and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        except OSError:
            pass
    assert children, f"no child started: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
    time.sleep(1.0)  # the child is importing or writing the world
    assert (ws / ".lock").read_text().startswith(f'{{"pid": {proc.pid}')  # the lock names its holder
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "misp: [experiment] stage world: interrupted by SIGTERM: the child" in err, err[-3000:]
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)  # reaped: no orphan training on
    assert not (ws / ".stamps/world.sha256").exists()  # the interrupted stage is not stamped done
    assert not (ws / "results.jsonl").exists()


# --- configuration errors: one line naming the option or the file, before any model loads ---------------------
def test_configuration_errors_name_the_option_or_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dpo = method_configs("dpo", ROOT)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  init_args:\n    lr: [1, 2\n")
    a_file = tmp_path / "export"
    a_file.write_text("not a folder")
    import yaml

    mixed = tmp_path / "mixed.yaml"  # the SAE module with the SFT stage's data: a module of the wrong kind
    mixed.write_text(yaml.safe_dump(yaml.safe_load((ROOT / "configs/shapes/sae.yaml").read_text())
                                    | {"data": yaml.safe_load((ROOT / "configs/shapes/sft.yaml").read_text())["data"]}))
    cases = [
        (["fit", *dpo, "--config", str(bad_yaml)], rf"--config {re.escape(str(bad_yaml))}: not valid YAML: line 4, column 1"),
        (["fit", *dpo, "--model.init_args.lr=-1e-4"], r"model.init_args.lr: a learning rate must be positive, got -0.0001"),
        (["fit", *dpo, "--model.init_args.lr=0"], r"model.init_args.lr: a learning rate of 0 trains nothing"),
        (["fit", *dpo, "--model.init_args.method.beta=.inf"], r"model.init_args.method.beta: inf is not a finite number"),
        (["fit", *dpo, "--trainer.max_epochs=0"], r"trainer.max_epochs is 0: the fit would train nothing"),
        (["fit", *dpo, f"--model.init_args.export_dir={a_file}"],
         rf"model.init_args.export_dir {re.escape(str(a_file))}: is an existing file, not a folder"),
        (["experiment", "--config", str(bad_yaml)], rf"--config {re.escape(str(bad_yaml))}: not valid YAML"),
        (["fit", "--config", str(mixed)], r"model.class_path misp.sae.module.SAEModule trains on the batches of "
         r"misp.data.negative_sampler.NegativeSamplerDataModule, but data.class_path is misp.data.sft_data.SFTDataModule"),
    ]
    for args, expected in cases:
        err = _cli_error(args, capsys)
        assert re.search(rf"^misp: error: {expected}", err), (args, err)
        assert len(err.strip().splitlines()) == 1, err


# --- training nothing is an error, not an export; non-finite weights are not evaluated -----------------------
def test_untrained_and_non_finite_models_are_never_reported_as_results(tiny_world, vlm_dir, tmp_path, capsys, monkeypatch):
    from misp.callbacks import FIT_DONE
    from misp.checkpoints import read_checkpoint

    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    ckpt_args: list[str] = []  # preference.yaml's ModelCheckpoint(save_last) writes <root>/checkpoints
    # no training batch: no optimizer step, so nothing is exported as the "trained" model
    export = tmp_path / "export"
    err = _cli_error([*_dpo_fit_args(tiny_world, vlm_dir, root, "--trainer.limit_train_batches=0", "--trainer.max_epochs=1"),
                      f"--model.init_args.export_dir={export}"], capsys)
    assert "misp: error: the fit took no optimizer step" in err and "nothing is exported" in err, err
    assert not export.exists() and not (root / FIT_DONE).exists()
    # `--ckpt_path last` with no checkpoint would score the untrained model
    evaluate = [a.replace("fit", "test", 1) if a == "fit" else a for a in _dpo_fit_args(tiny_world, vlm_dir, root)]
    err = _cli_error([*evaluate, *ckpt_args, "--ckpt_path", "last"], capsys)
    assert "misp: error: --ckpt_path last: no such checkpoint" in err and "untrained model" in err, err
    # a trained checkpoint whose weights turned NaN is refused, naming it and the weight
    main([*_dpo_fit_args(tiny_world, vlm_dir, root, "--trainer.max_steps=1"), *ckpt_args])
    assert (root / FIT_DONE).is_file()
    ckpt = read_checkpoint(root / "checkpoints/last.ckpt")
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name][0] = float("nan")
    poisoned = tmp_path / "nan.ckpt"
    torch.save(ckpt, poisoned)
    err = _cli_error([*evaluate, "--ckpt_path", str(poisoned)], capsys)
    assert f"misp: error: checkpoint {poisoned}: weight {name} holds 1 NaN or infinite value" in err, err
    assert not (root / "test_results.json").exists()


# --- text: special-token strings inside data are refused, naming file, line, field and record -------------------
def test_a_special_token_string_inside_a_record_is_refused_not_tokenised(tmp_path, tiny_world, vlm_dir):
    import json
    from types import SimpleNamespace

    from misp.data.negative_sampler import NegativeSamplerDataModule
    from misp.data.records import RecordError
    from misp.models.prompting import encode_example
    from misp.models.vlm import VLMSpec, load_vlm

    processor = load_vlm(VLMSpec(path=str(vlm_dir)))[1]
    eos = processor.tokenizer.eos_token
    ok = encode_example(processor, "describe the image.", "a red circle.")
    assert ok["labels"].count(processor.tokenizer.eos_token_id) == 1  # the one EOS misp appends
    rows = [json.loads(x) for x in (tiny_world / "pref.jsonl").read_text().splitlines()[:6]]
    for r in rows:
        r["image"] = str(tiny_world / r["image"])
    for index, field, text in [(2, "chosen", f"a red circle{eos} and more."), (4, "prompt", f"{eos} describe the image.")]:
        bad = [dict(r) for r in rows]
        bad[index][field] = text
        path = tmp_path / f"pref{index}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in bad))
        dm = NegativeSamplerDataModule(records_file=str(path), progress=False, preview_records=0)
        dm.attach(SimpleNamespace(processor=processor))
        dm.prepare_data()
        expected = (rf"pref{index}.jsonl:{index + 1}: field '{field}': record '{rows[index]['id']}': the "
                    rf"{'response' if field == 'chosen' else 'prompt'} contains the special token {re.escape(repr(eos))} as text")
        with pytest.raises(RecordError, match=expected):
            dm.setup("fit")


# --- EXIF orientation ------------------------------------------------------------------------------------------
def test_an_exif_rotated_photo_loads_upright(tmp_path):
    import numpy as np
    from PIL import Image

    from misp.images import load_rgb

    upright = np.zeros((8, 16, 3), dtype=np.uint8)
    upright[:, :8] = (255, 0, 0)  # red left half, blue right half: a wide image
    upright[:, 8:] = (0, 0, 255)
    # What a phone writes: the pixels turned 90 degrees, and EXIF orientation 6 ("rotate 90 CW to view").
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=100)
    assert Image.open(path).size == (8, 16)
    loaded = np.asarray(load_rgb(path)).astype(int)
    assert loaded.shape == (8, 16, 3)
    assert loaded[:, :6, 0].mean() > 200 and loaded[:, :6, 2].mean() < 50  # red on the left again
    assert loaded[:, 10:, 2].mean() > 200 and loaded[:, 10:, 0].mean() < 50


# --- exports and checkpoints of another base ------------------------------------------------------------------
def test_broken_foreign_and_malicious_exports_are_refused_naming_the_file(tmp_path, vlm_dir, tiny_world, capsys, monkeypatch):
    import shutil

    from misp.errors import CheckpointError
    from misp.models.vlm import ADAPTER_SUBDIR, LoraSpec, VLMSpec, load_vlm, save_vlm

    # an unmerged LoRA export whose adapter lost adapter_config.json would load as the plain base
    model, processor = load_vlm(VLMSpec(path=str(vlm_dir), lora=LoraSpec(r=2, alpha=4)))
    export = save_vlm(model, processor, tmp_path / "export", merge_lora=False)
    (export / ADAPTER_SUBDIR / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(export / ADAPTER_SUBDIR))} lacks adapter_config.json"):
        load_vlm(VLMSpec(path=str(export)))
    # a pytorch_model.bin holding a payload: refused, naming the file, never suggesting weights_only=False
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    shutil.copytree(vlm_dir, evil)
    for weights in evil.glob("*.safetensors"):
        weights.unlink()
    torch.save({"w": _Payload(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin holds objects other than tensors") as info:
        load_vlm(VLMSpec(path=str(evil)))
    assert "weights_only=False" not in str(info.value) and not marker.exists()
    # a checkpoint trained on a base of another width: one line naming it and the weight
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "wide.ckpt"
    torch.save({"pytorch-lightning_version": "2.6", "state_dict": {
        "model.model.language_model.embed_tokens.weight": torch.zeros(3, 999)}}, ckpt)
    evaluate = ["test", *method_configs("dpo", ROOT), f"--model.init_args.vlm.path={vlm_dir}",
                f"--data.records_file={tiny_world / 'pref.jsonl'}", f"--data.evaluation.pope_file={tiny_world / 'pope.jsonl'}",
                f"--data.evaluation.captions_file={tiny_world / 'test.jsonl'}", "--data.progress=false"]
    err = _cli_error([*evaluate, "--ckpt_path", str(ckpt)], capsys)
    assert re.search(rf"misp: error: checkpoint {re.escape(str(ckpt))}: weight \S+embed_tokens.weight has shape \(3, 999\)", err), err


def test_an_adapter_of_a_base_of_another_width_is_refused_naming_it(tmp_path, tiny_world, vlm_dir):
    import json

    from misp.errors import CheckpointError
    from misp.models.tiny_llava import TinyLlavaConfig, build_tiny_llava
    from misp.models.vlm import ADAPTER_SUBDIR, LoraSpec, VLMSpec, load_vlm, save_vlm
    from misp.smoke import SMOKE_LLAVA

    words = json.loads((tiny_world / "world.json").read_text())["vocabulary"]
    wide = tmp_path / "wide"  # the smoke LLaVA with twice its text width
    save_vlm(*build_tiny_llava(words, TinyLlavaConfig(**SMOKE_LLAVA | {"text_hidden_size": 128, "text_intermediate_size": 256})),
             wide)
    model, processor = load_vlm(VLMSpec(path=str(wide), lora=LoraSpec(r=2, alpha=4)))
    adapter = save_vlm(model, processor, tmp_path / "wide_lora", merge_lora=False) / ADAPTER_SUBDIR
    with pytest.raises(CheckpointError, match=rf"adapter {re.escape(str(adapter))}: made for a base of another width "
                                              rf"than {re.escape(str(vlm_dir))} \(.*size mismatch"):
        load_vlm(VLMSpec(path=str(vlm_dir), adapter=str(adapter)))
