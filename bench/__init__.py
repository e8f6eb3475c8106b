"""Performance benchmarks of misp: speed and memory of negative mining, log-prob extraction and the VLM forward.

Run by hand or with ``make bench`` (``python -m bench [NAMES...]``); not part of the test suite. Each
benchmark measures a misp implementation side by side with its naive alternative in one run, so the
ratios hold on any machine; the absolute numbers are stamped with :func:`machine_info`.

Memory is measured per configuration in a fresh child process (:func:`run_child`):

- CPU: ``tracemalloc`` cannot see torch's allocations, so the peak comes from the kernel's resident-set
  high-water mark. Before each measured region the mark is reset (``/proc/self/clear_refs``, Linux) and
  the peak is ``VmHWM - VmRSS`` at entry; where the reset is unavailable, the ``getrusage`` ``ru_maxrss``
  delta is used instead (only exact when the region is the process's largest so far). The child runs
  with a fixed glibc mmap threshold, so every tensor of 64 KiB or more is its own mapping, returned to
  the system when freed: otherwise memory freed by an earlier stage would be reused by a later one
  without raising the mark, and that stage's peak would read low.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  at entry.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "RESULTS_DIR",
    "PeakMemory",
    "child_env",
    "default_device",
    "describe_machine",
    "format_table",
    "machine_info",
    "mib",
    "run_child",
    "synchronize",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where ``python -m bench`` writes ``<name>.json``."""

_MMAP_THRESHOLD = 65536  # bytes; a fixed value also switches off glibc's dynamic threshold


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on ``device`` so that wall-clock times cover the work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def mib(n_bytes: float) -> float:
    """Bytes to MiB, rounded to 0.1."""
    return round(n_bytes / 2**20, 1)


def _status_kib(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's resident-set high-water mark (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


class PeakMemory:
    """Context manager: the peak memory a region allocated on top of what was live at its entry.

    After the ``with`` block, ``peak_bytes`` holds the peak and ``method`` says how it was measured
    (``cuda``, ``vmhwm`` or ``getrusage``; see the module docstring). Regions must not overlap.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ""
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda"
        elif _reset_hwm():
            self._base = (_status_kib("VmRSS") or 0) * 1024
            self.method = "vmhwm"
        else:
            self._base = _maxrss_bytes()
            self.method = "getrusage"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "vmhwm":
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = _maxrss_bytes()
        self.peak_bytes = max(0, peak - self._base)


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a measuring child: fixed mmap threshold (see module docstring), offline, quiet."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(_MMAP_THRESHOLD)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_child(target: str, config: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """Run ``target`` (``"bench.module:function"``) on ``config`` in a fresh Python process.

    The function gets the config dict and returns a JSON-serialisable dict, which comes back here. A
    failing child raises ``RuntimeError`` with the tail of its stderr.
    """
    repo_root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="misp-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench", "--child", target, json.dumps(config), str(out)]
        if threads is not None:
            cmd += ["--child-threads", str(threads)]
        proc = subprocess.run(cmd, cwd=repo_root, env=child_env(threads), capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"benchmark child {target} failed (exit {proc.returncode}) on {config}:\n{tail}")
        return json.loads(out.read_text())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


def machine_info(device: str | torch.device) -> dict[str, Any]:
    """What the absolute numbers were measured on: CPU, cores, memory, GPU, library versions, load."""
    device = torch.device(device)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _total_memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line for the table header."""
    text = f"{info['device']}: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads)"
    if info.get("memory_gib") is not None:
        text += f", {info['memory_gib']} GiB RAM"
    if "gpu" in info:
        text += f", {info['gpu']} ({info['gpu_memory_gib']} GiB)"
    text += f"; torch {info['torch']}"
    if info.get("load_average_1m") is not None:
        text += f"; load {info['load_average_1m']} at start"
    return text


def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` over ``columns`` (``(key, header)`` pairs); floats to 3 significant digits."""

    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = [
        "| " + " | ".join(h for _, h in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)
