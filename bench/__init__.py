"""Performance benchmarks of misp: speed and memory of negative mining, log-prob extraction and the VLM forward.

Run by hand or with ``make bench`` (``python -m bench [NAMES...]``); not part of the test suite. Each
benchmark measures a misp implementation side by side with its naive alternative in one run, so the
ratios hold on any machine; the absolute numbers are stamped with :func:`machine_info`.

Memory is measured per configuration in a fresh child process (:func:`run_child`):

- CPU: ``tracemalloc`` cannot see torch's allocations, so the peak comes from the kernel's resident-set
  high-water mark. Before each measured region the mark is reset (``/proc/self/clear_refs``, Linux) and
  the peak is ``VmHWM - VmRSS`` at entry; where the reset is unavailable, the ``getrusage`` ``ru_maxrss``
  delta is used instead (only exact when the region is the process's largest so far). While measuring,
  glibc's allocator is pinned (``mallopt``) to give every block of 64 KiB or more its own mapping,
  returned to the system when freed: otherwise memory freed by an earlier stage would be reused by a
  later one without raising the mark, and that stage's peak would read low.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
  at entry.

Pinned that way the allocator maps and faults in fresh pages for every mid-sized tensor, which can
double the CPU time of a step, so timings are taken in a separate pass after :func:`allocator_steady`
has put glibc in the state its own adaptive thresholds reach in a long-running process.
"""

from __future__ import annotations

import ctypes
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
    "allocator_measure",
    "allocator_steady",
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

# glibc mallopt parameters and the thresholds of the two allocator modes (bytes).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MEASURE_MMAP, _MEASURE_TRIM = 64 * 1024, 128 * 1024
# glibc's adaptive mmap threshold climbs to at most 32 MiB (64-bit), the trim threshold to twice that.
_STEADY_MMAP, _STEADY_TRIM = 32 * 2**20, 64 * 2**20
_allocator_mode = "default"


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


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _set_allocator(mode: str, mmap_threshold: int, trim_threshold: int) -> bool:
    global _allocator_mode
    libc = _glibc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    libc.malloc_trim(0)
    _allocator_mode = mode if ok else "default"
    return ok


def allocator_measure() -> bool:
    """Pin glibc so that blocks of 64 KiB or more are mapped and unmapped one by one (memory regions).

    Benchmark children call it first thing (``python -m bench --child``): blocks freed before the pin sit
    in glibc's free lists and would be reused without raising the high-water mark. Returns False off
    glibc, where the allocator is left alone. Raises once :func:`allocator_steady` has run: measure
    memory first, time afterwards.
    """
    if _allocator_mode == "steady":
        raise RuntimeError("memory is measured with the allocator pinned: measure before allocator_steady()")
    return _allocator_mode == "measure" or _set_allocator("measure", _MEASURE_MMAP, _MEASURE_TRIM)


def allocator_steady() -> bool:
    """Put glibc in the steady state of its adaptive thresholds (32 MiB mmap, 64 MiB trim) for timing.

    One way: after it, :class:`PeakMemory` refuses to measure CPU memory in this process.
    """
    return _allocator_mode == "steady" or _set_allocator("steady", _STEADY_MMAP, _STEADY_TRIM)


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
    (``cuda``, ``vmhwm`` or ``getrusage``, with ``+pinned`` when the allocator was pinned; see the module
    docstring). On the CPU, entering pins the allocator, which slows what runs inside: time elsewhere.
    Regions must not overlap. With ``enabled=False`` it measures nothing (``peak_bytes`` stays 0).
    """

    def __init__(self, device: str | torch.device, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.peak_bytes = 0
        self.method = ""
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda"
            return self
        pinned_before = _allocator_mode == "measure"
        # Pinned only now, earlier frees may be reused unseen: say so in the method.
        pinned = ("+pinned" if pinned_before else "+pinned-late") if allocator_measure() else ""
        if _reset_hwm():
            self._base = (_status_kib("VmRSS") or 0) * 1024
            self.method = "vmhwm" + pinned
        else:
            self._base = _maxrss_bytes()
            self.method = "getrusage" + pinned
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        if self.method == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("vmhwm"):
            peak = (_status_kib("VmHWM") or 0) * 1024
        else:
            peak = _maxrss_bytes()
        self.peak_bytes = max(0, peak - self._base)


def child_env(threads: int | None = None) -> dict[str, str]:
    """Environment of a benchmark child: offline, quiet, optionally a fixed OpenMP thread count."""
    env = dict(os.environ)
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
