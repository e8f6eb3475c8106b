"""The one handshake between a datamodule and the module it feeds: ``datamodule.attach(module)``.

It runs one way in each direction and hands over values, never the objects themselves:

- the module hands the data the values it needs (``module.data_values() -> ModuleValues``): the VLM's
  processor, the CLIP bundle, a reader of the proposal q_phi, and the method's negatives (source and K:
  the method is their one home, ``misp.dpo.method``);
- the data hands the module a typed description of itself (``module.attach_data(DataDescription)``): the
  evaluation and validation sets, q_phi's features of the negatives it mined (indexed by record), the
  SAE's difference vectors.

misp's CLI calls ``attach`` after building both; in Python, call ``data.attach(module)`` before
``Trainer.fit``. Forgetting it is the same one-line ``NotAttachedError`` (a ``misp.errors.UserError``)
whichever side notices first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from misp.errors import UserError


class NotAttachedError(UserError):
    """A datamodule or a module was used before ``datamodule.attach(module)``."""


def not_attached(who: object, what: str) -> NotAttachedError:
    """The one error of a forgotten handshake, naming who noticed and what it lacked."""
    return NotAttachedError(
        f"{type(who).__name__} has no {what}: call `datamodule.attach(module)` before Trainer.fit/validate/test "
        "(the misp CLI does it for you)"
    )


@dataclass
class ModuleValues:
    """What a module hands the data it is attached to."""

    processor: Any = None
    """The VLM's processor (a VLM datamodule encodes text and images with it)."""
    clip: Any = None
    """The CLIP bundle (model, transforms, tokenizer) a CLIP datamodule prepares images and captions with."""
    proposal_log_q: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None
    """``(features [R, M, F], valid [R, M]) -> log q_phi [R, M]`` (or None: uniform), between steps."""
    negatives: Any = None
    """The method's negatives (``misp.dpo.method.Negatives``: source and K) a preference datamodule draws."""
    in_context: bool = False
    """A term reads IC-VCO's two-image pairs: a source that pairs responses also builds those rows."""


@dataclass
class ProposalFeatures:
    """The SAE features of every record's M selected negatives, which q_phi reads, indexed by record id."""

    features: torch.Tensor
    """``[R, M, F]`` per record, the SAE features of its selected negatives."""
    valid: torch.Tensor
    """``[R, M]`` bool: which selected slots hold a negative."""
    rows: dict[str, int] = field(default_factory=dict)
    """Record id -> its row."""

    def for_records(self, ids: list[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [B, M, F], valid [B, M])`` of the records ``ids``, on ``device``."""
        index = torch.tensor([self.rows[i] for i in ids], dtype=torch.long)
        return self.features[index].to(device), self.valid[index].to(device)


@dataclass
class NegativesDescription:
    """What a preference datamodule knows of the negatives it draws that its module reads (source and K are
    the method's, which the module already holds)."""

    proposal_features: Callable[[], ProposalFeatures | None] = lambda: None
    """q_phi's features (known once mining ran; None for sources other than ``sae``)."""


@dataclass
class DifferenceVectors:
    """The SAE's training data, as the SAE module needs to know it (each call mines first if needed)."""

    dim: Callable[[], int]
    """The difference vectors' width (the SAE's input)."""
    sample: Callable[[int], torch.Tensor]
    """``n -> [<=n, dim]`` seeded training vectors (the SAE's initial pre-bias)."""
    metadata: Callable[[], dict]
    """What the SAE's export records about the embedding it was trained in."""


@dataclass
class DataDescription:
    """What a datamodule hands its module."""

    evaluation: Any = None
    """The sets ``test`` reports (``misp.data.eval_data.EvalData``)."""
    validation: Any = None
    """The sets validated on during fit (``EvalData``)."""
    negatives: NegativesDescription | None = None
    """The negatives a preference datamodule draws."""
    differences: DifferenceVectors | None = None
    """The difference vectors a datamodule serves the SAE."""


class AttachesToModule:
    """Mixin for datamodules: ``attach(module)`` and the values it took from the module."""

    _module_values: ModuleValues | None = None

    def attach(self, module) -> None:
        """Take the values this data needs from ``module``; hand ``module`` this data's description."""
        values = getattr(module, "data_values", None)
        # A module without data_values (a notebook's stand-in) hands over its processor and negatives, if it has them.
        self._module_values = values() if values is not None else ModuleValues(
            getattr(module, "processor", None), negatives=getattr(module, "negatives", None))
        self.take_values(self._module_values)
        self.processor = self._module_values.processor
        attach_data = getattr(module, "attach_data", None)
        if attach_data is not None:
            attach_data(self.describe())

    def take_values(self, values: ModuleValues) -> None:
        """Hook: a datamodule that derives state from the module's values (its negatives) does it here."""

    def describe(self) -> DataDescription:
        """This data as its module needs to know it (datamodules with negatives or vectors add them)."""
        return DataDescription(getattr(self, "evaluation", None), getattr(self, "validation", None))

    def module_value(self, name: str):
        """The value ``name`` of ``ModuleValues`` the module handed over.

        Raises:
            NotAttachedError: ``attach`` was never called.
            UserError: the attached module has no such value (e.g. a VLM datamodule fed to a CLIP module).
        """
        if self._module_values is None:
            raise not_attached(self, f"module's {name}")
        value = getattr(self._module_values, name)
        if value is None:
            raise UserError(f"{type(self).__name__} needs its module's {name}, and the attached module has none")
        return value
