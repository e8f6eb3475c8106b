"""The notebooks: each runs end to end in smoke mode (as nbmake runs it), and is committed clean."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["sae_features.ipynb", "negatives.ipynb", "ablations.ipynb"]


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """One folder of smoke artifacts shared by the notebooks (each builds what is missing, then reuses it)."""
    return tmp_path_factory.mktemp("notebook-smoke")


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_smoke_mode(name, smoke_dir):
    env = {
        **os.environ,
        "MISP_SMOKE": "1",
        "MISP_SMOKE_DIR": str(smoke_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "MPLBACKEND": "Agg",
        # The virtual environment's python3 kernel, not one a user may have registered elsewhere.
        "JUPYTER_PREFER_ENV_PATH": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbmake", str(ROOT / "notebooks" / name), "-p", "no:cacheprovider", "-q"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{name} failed in smoke mode:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "1 passed" in proc.stdout


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} carry outputs; clear them before committing"
    assert any('os.environ.get("MISP_SMOKE") == "1"' in c.source for c in code), f"{name} has no smoke mode"
