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
