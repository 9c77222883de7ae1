"""A checkpoint's tensor files as they are stored, plain (safetensors) or compressed (ztensors),
behind one reader: resume, inference, export, inspect and diff read either without asking which."""

from __future__ import annotations

from pathlib import Path

import torch

from .format import COMPRESSED_SUFFIX
from .io import CheckpointError, read_tensor_header
from .ztensors import ZstdTensorReader


class _SafetensorsReader:
    """``safetensors.safe_open`` with the reader interface of :class:`~.ztensors.ZstdTensorReader`."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from safetensors import safe_open

        self._cm = safe_open(path, framework="pt", device=device)
        self._file = self._cm.__enter__()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(None, None, None)

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def get_all(self) -> dict[str, torch.Tensor]:
        return {name: self._file.get_tensor(name) for name in self._file.keys()}


def open_tensor_file(path: str | Path, device: str = "cpu"):
    """A reader of a checkpoint's tensor file, plain (safetensors) or compressed (ztensors):
    ``keys()``, ``shape(name)``, ``get_tensor(name)``, ``get_all()``; a context manager."""
    if str(path).endswith(COMPRESSED_SUFFIX):
        return ZstdTensorReader(path, device)
    return _SafetensorsReader(path, device)


def read_tensor_file(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a plain or compressed tensor file."""
    with open_tensor_file(path, device) as reader:
        return reader.get_all()


def stored_metadata(path: str | Path) -> dict:
    """The ``__metadata__`` of a plain or compressed tensor file (its header only is read); {} when
    the header cannot be read."""
    try:
        return read_tensor_header(path).get("__metadata__") or {}
    except CheckpointError:
        return {}
