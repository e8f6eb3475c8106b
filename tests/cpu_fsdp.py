"""Test support: misp's FSDP strategy (FSDP1) on CPU processes over gloo.

Lightning hands FSDP ``device_id=root_device.index``, which is None on CPU, and FSDP then looks for an
accelerator and refuses. Passing the CPU device itself runs the same FSDP code on CPU. Nothing else differs
from ``misp.training.FSDPStrategy``, so a shipped config's strategy runs here as shipped, with only its
``class_path`` swapped for this one. Subprocesses import it as ``cpu_fsdp.CPUFSDPStrategy`` (tests/ on
PYTHONPATH).
"""

from __future__ import annotations

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision

from misp.training import FSDPStrategy


class _CPUAutocastFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision, autocasting on the CPU where Lightning autocasts on CUDA (``*-mixed``)."""

    def forward_context(self):
        if "mixed" in self.precision:
            return torch.autocast("cpu", dtype=torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16)
        return super().forward_context()


class CPUFSDPStrategy(FSDPStrategy):
    """``misp.training.FSDPStrategy`` with FSDP's ``device_id`` set to the CPU, and CPU autocast (tests only)."""

    @FSDPStrategy.precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin.__class__ = _CPUAutocastFSDPPrecision
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def fsdp_device_id(self) -> torch.device:
        return torch.device("cpu")
