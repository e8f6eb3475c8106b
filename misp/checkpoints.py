"""Checkpoints that are written whole and read with an error that names them.

Writing. Lightning's ``TorchCheckpointIO`` writes a local checkpoint into a temporary file under the
system temp folder and moves it into place. Across file systems that move is a copy, so a full disk or a
killed process leaves a truncated ``epoch=..ckpt`` behind, which a later ``--ckpt_path`` trips over.
:class:`AtomicCheckpointIO` writes the bytes into a temporary file in the checkpoint's own folder, syncs
it and renames it over the target (``misp.utils.io.atomic_write_bytes``): the old checkpoint or the whole
new one, never a part. ``misp`` installs it on every Trainer whose strategy uses the plain
``TorchCheckpointIO``; sharded FSDP checkpoints are written by ``torch.distributed.checkpoint``, whose
``meta.pt`` (written last) is their commit mark.

Reading. :func:`read_checkpoint` opens a checkpoint file (or a sharded checkpoint folder's ``meta.pt``)
with ``weights_only=True`` and turns a truncated or foreign file into a :class:`CheckpointError` naming
the path and what to do. A sharded folder's ``.metadata`` is a plain pickle that torch's
``FileSystemReader`` reads with ``pickle.load`` (so a crafted one runs code); misp reads it only through
:func:`read_dcp_metadata`, whose unpickler builds nothing but the checkpoint-metadata dataclasses, torch
sizes, dtypes and layouts (:class:`SafeFileSystemReader` is torch's reader with that one read replaced),
and refuses anything else naming the file. :func:`method_mismatches` compares the settings a checkpoint was trained with
against the run's, so a checkpoint of one method is never silently loaded under another's config.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO

from misp.errors import CheckpointError
from misp.utils.io import atomic_write_bytes

SPECIAL_PATHS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values Lightning resolves itself (to a file of a ``ModelCheckpoint``)."""

LIGHTNING_KEY = "pytorch-lightning_version"
"""Every Lightning checkpoint holds this key; exports and plain state dicts do not."""

METHOD_KEYS = {
    "hyper_parameters": ("_class_path", "method"),
    "datamodule_hyper_parameters": ("_class_path", "serve"),
}
"""Settings that make a checkpoint another method's: the module class and its method (terms, negative
source and K), and the data's class and what it serves. A difference in any of them is an error; other differences are
reported in a warning (the config's values are used)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local checkpoints atomically and reads them with clear errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local_file_protocol(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location=map_location or "cpu", weights_only=weights_only)


def read_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = True, mmap: bool = False
) -> dict[str, Any]:
    """A Lightning checkpoint's contents: a file, or a sharded checkpoint folder's ``meta.pt``.

    Args:
        path: the checkpoint file, or a folder written by FSDP with ``state_dict_type: sharded``.
        map_location: where tensors are loaded.
        weights_only: ``torch.load``'s safe mode (misp's checkpoints hold plain data only).
        mmap: map the file instead of reading it (a cheap check of a large checkpoint: the archive's
            structure and the metadata are read, the tensors' bytes are not).

    Raises:
        CheckpointError: missing, truncated, unreadable, or not a Lightning checkpoint; the message names
            the path.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: no such file or folder")
    if p.is_dir():
        meta = p / _METADATA_FILENAME
        if not meta.is_file() or not (p / ".metadata").is_file():
            raise CheckpointError(
                f"checkpoint {p}: a folder, but not a complete sharded checkpoint (it needs {_METADATA_FILENAME} "
                "and .metadata; a save killed half-way leaves them out): resume from an earlier checkpoint"
            )
        read_dcp_metadata(p)  # a crafted .metadata is refused here, before anything unpickles it
        return _load(meta, p, map_location, True, False)
    return _load(p, p, map_location, weights_only, mmap)


_DCP_MODULES = "torch.distributed.checkpoint"
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                 ("copyreg", "_reconstructor"), ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"),
                 ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                 ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a torch.distributed.checkpoint ``.metadata`` holds: that package's dataclasses and
    enums, torch sizes, dtypes, layouts and memory formats, paths. Any other global is refused, so no function
    named by the file is ever called."""

    def find_class(self, module: str, name: str) -> Any:
        import dataclasses
        import enum
        import importlib

        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        elif module == _DCP_MODULES or module.startswith(_DCP_MODULES + "."):
            value = getattr(importlib.import_module(module), name, None)
            if isinstance(value, type) and (dataclasses.is_dataclass(value) or issubclass(value, enum.Enum)):
                return value
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_dcp_metadata(folder: str | os.PathLike, filename: str = ".metadata") -> Any:
    """The ``Metadata`` of a torch.distributed.checkpoint folder, read without running code from the file.

    Args:
        folder: the sharded checkpoint folder.
        filename: its metadata file (torch's default name, or a per-rank one).

    Raises:
        CheckpointError: ``.metadata`` is missing, truncated, or names anything but checkpoint metadata
            (a crafted pickle); the message names the file.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    file = Path(folder) / filename
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {file}: refused, it is not checkpoint metadata ({_first_line(e)}); misp unpickles only "
            "the metadata classes of torch.distributed.checkpoint, so a crafted file runs nothing. Delete the "
            "folder, it was not written by misp"
        ) from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise _unreadable(file, e) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {file}: holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


def safe_file_system_reader(path: str | os.PathLike) -> Any:
    """torch's ``FileSystemReader`` for ``path`` whose ``read_metadata`` is :func:`read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            file = Path(self._get_metadata_path(kwargs.get("rank")))  # the file torch's reader would open
            metadata = read_dcp_metadata(file.parent, file.name)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def _load(file: Path, shown: Path, map_location: Any, weights_only: bool | None, mmap: bool) -> dict[str, Any]:
    try:
        ckpt = torch.load(file, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"checkpoint {shown}: holds objects other than tensors and plain data, so misp will not unpickle "
                f"it (weights_only=True); it was not written by misp ({_first_line(e)})"
            ) from None
        raise _unreadable(shown, e) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise _unreadable(shown, e) from None
    if not isinstance(ckpt, dict) or LIGHTNING_KEY not in ckpt:
        kind = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"a dict without {LIGHTNING_KEY!r}"
        raise CheckpointError(
            f"checkpoint {shown}: not a Lightning checkpoint ({kind}); --ckpt_path takes a file from a run's "
            "checkpoints/ folder, not an export or a bare state dict"
        )
    return ckpt


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path}: cannot be read ({type(error).__name__}: {_first_line(error)}); it is truncated (a "
        "full disk or a killed save) or not a PyTorch checkpoint: delete it and resume from another one"
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: value}


def _plain(value: Any) -> str:
    # Lists and tuples, ints and floats of equal value compare equal; anything else by its repr.
    return json.dumps(value, sort_keys=True, default=repr)


def method_mismatches(
    checkpoint: Mapping[str, Any], current: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[str]]:
    """How the settings stored in ``checkpoint`` differ from the run's ``current`` ones.

    Args:
        checkpoint: a loaded Lightning checkpoint.
        current: ``{"hyper_parameters": module.hparams, "datamodule_hyper_parameters": datamodule.hparams}``
            of the run about to load it (either may be missing).

    Returns:
        (errors, differences): one line per differing setting, ``section.key: checkpoint X, config Y``;
        ``errors`` for the settings of ``METHOD_KEYS``, ``differences`` for the others. Keys absent on
        either side (options added since) are not compared.
    """
    errors: list[str] = []
    differences: list[str] = []
    for section, method in METHOD_KEYS.items():
        stored, now = checkpoint.get(section), current.get(section)
        if not stored or now is None:
            continue
        a, b = _flatten(stored), _flatten(now)
        for key in sorted(a.keys() & b.keys()):
            if key == "_instantiator" or _plain(a[key]) == _plain(b[key]):
                continue
            name = "model" if section == "hyper_parameters" else "data"
            line = f"{name}.{key}: checkpoint {a[key]!r}, config {b[key]!r}"
            (errors if key.split(".")[0] in method else differences).append(line)
    return errors, differences
