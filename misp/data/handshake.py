"""The one handshake between a datamodule and the module it feeds: ``datamodule.attach(module)``.

A VLM datamodule needs its module's processor (and MISP-DPO's data the module's q_phi); the modules need
what the data holds (evaluation sets, the negatives' source and K, the SAE's input width). Instead of each
side reaching for the other through the Trainer at run time, ``attach`` hands them over once, explicitly:
misp's CLI calls it after building both; in Python, call ``data.attach(module)`` before ``Trainer.fit``.
"""

from __future__ import annotations


class NotAttachedError(RuntimeError):
    """A datamodule was set up before ``attach(module)``."""


class AttachesToModule:
    """Mixin for datamodules: ``attach(module)`` and the check that it happened."""

    _attached_module = None

    def attach(self, module) -> None:
        """Take what this data needs from ``module`` and give ``module`` what it needs from this data.

        The module needs ``processor`` when this data encodes text or images for it; a module with
        ``attach_data(data)`` (misp's VLM, DPO and SAE modules) receives this datamodule there.
        """
        self._attached_module = module
        self.processor = getattr(module, "processor", None)
        attach_data = getattr(module, "attach_data", None)
        if attach_data is not None:
            attach_data(self)

    def attached_module(self, what: str):
        """The attached module; a clear error naming what needed it when ``attach`` was never called."""
        if self._attached_module is None:
            raise NotAttachedError(
                f"{type(self).__name__} needs the module's {what}: call `datamodule.attach(module)` before "
                "Trainer.fit/validate/test (the misp CLI does it for you)"
            )
        return self._attached_module
