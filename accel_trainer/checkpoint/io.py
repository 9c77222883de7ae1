"""Durable, atomic file operations and safe loading: the rules every checkpoint write and read follows.

* A file counts as written only after ``fsync``; a folder's new entries only after the folder is fsynced.
* Small files that are replaced (pointers, markers) are written to a temporary name, fsynced, and
  renamed over the old one, so a reader sees the old or the new content, never a torn one.
* Nothing is unpickled unless ``torch.load(weights_only=True)`` allows it, and pickle-based files are
  scanned for disallowed globals before any loading, so a malicious file is refused and runs nothing.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from ..errors import CheckpointError
from .format import TMP_PREFIX, state_file


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file, then every folder bottom-up, under ``root``."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably (tmp file + fsync + rename + fsync dir)."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")  # a crash's leftover is cleaned like others
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-written temporary behind
        raise
    fsync_dir(path.parent)


def write_json(path: str | Path, obj) -> None:
    """Write JSON and fsync it (used inside a temporary checkpoint folder, so no rename is needed)."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: str | Path):
    """Parse a JSON file; any failure to read or decode it is a :class:`CheckpointError` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {err.start}); the file is damaged") from None
    except OSError as err:  # a folder where a file should be, no permission, I/O error
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None


def read_tensor_header(path: str | Path) -> dict:
    """The JSON header of a tensor file laid out as safetensors is (and ztensors after it): 8 bytes of
    little-endian length, then that much JSON; no tensor is read.

    Raises:
        CheckpointError: unreadable, or not such a header.
    """
    import struct

    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 1 << 30:
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointError(f"{path}: not a readable tensor file header ({type(err).__name__}: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable tensor file header (not a JSON object)")
    return header


def is_plain_json(obj) -> bool:
    """True when ``obj`` survives a JSON round trip unchanged: dicts with string keys, lists, strings,
    numbers, booleans and None (tuples and int keys would come back as lists and strings)."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return True
    if isinstance(obj, list):
        return all(is_plain_json(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and is_plain_json(v) for k, v in obj.items())
    return False


def write_state(folder: Path, name: str, state) -> str:
    """Write a named ``state_dict()``: JSON when it round-trips exactly, else ``torch.save`` (read back
    with ``weights_only=True``). Returns the file name."""
    file = state_file(name, is_plain_json(state))
    if file.endswith(".json"):
        write_json(folder / file, state)
    else:
        import torch

        torch.save(state, folder / file)
    return file


def read_state(folder: Path, name: str):
    """Read what :func:`write_state` wrote for ``name``.

    Raises:
        CheckpointError: no such state in ``folder``, or it is not loadable as data.
    """
    for plain_json in (True, False):
        path = folder / state_file(name, plain_json)
        if path.is_file():
            return read_json(path) if plain_json else safe_torch_load(path)
    raise CheckpointError(f"{folder}: no saved state named {name!r} ({state_file(name)} or {state_file(name, False)})")


# numpy globals that Accelerate itself allows when it loads its RNG files; they rebuild arrays, run no code.
_ALLOWED_GLOBALS_PREFIXES = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                             "numpy.ndarray", "numpy.dtype", "numpy.dtypes.", "numpy.core.multiarray.scalar",
                             "numpy._core.multiarray.scalar")


def check_pickle_is_data(path: str | Path) -> None:
    """Refuse a torch-saved file whose pickle names globals that weights-only loading does not allow.

    Reads only the pickle opcodes, never executes them.

    Raises:
        CheckpointError: naming the file and the offending globals.
    """
    import torch

    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a torch zip file at all
        raise CheckpointError(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None
    unsafe = [g for g in unsafe if not g.startswith(_ALLOWED_GLOBALS_PREFIXES)]
    if unsafe:
        raise CheckpointError(
            f"{path}: refused: its pickle references {unsafe[:5]}, which could run code when loaded. "
            "A checkpoint must be data only; this file is corrupt, malicious, or written by another tool")


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickler for torch.distributed.checkpoint's ``.metadata`` that can only build DCP's metadata
    records (torch reads that file with plain ``pickle.load``, which would run anything)."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
               ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        import torch

        allowed = ((module, name) in self.ALLOWED or module == "torch.distributed.checkpoint.metadata"
                   or (module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                       torch.memory_format))))
        if not allowed:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def check_dcp_metadata_is_data(path: str | Path) -> None:
    """Refuse a sharded checkpoint's ``.metadata`` that references anything but DCP's own records.

    Raises:
        CheckpointError: naming the file and the offending global.
    """
    try:
        with open(path, "rb") as f:
            _DcpMetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: {err}; a sharded checkpoint's metadata must be data only, "
                              "this file is corrupt, malicious, or written by another tool") from None
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable sharded-checkpoint metadata ({type(err).__name__}: {err})") from None


def safe_torch_load(path: str | Path, map_location="cpu", numpy: bool = False):
    """``torch.load(weights_only=True)`` with the file scanned first and a clear error on refusal.

    ``numpy=True`` also allows numpy arrays, as in the RNG files Accelerate writes (read through
    Accelerate's own ``load``, which allows exactly those).
    """
    import torch

    check_pickle_is_data(path)
    try:
        if numpy:
            from accelerate.utils import load

            return load(path, map_location=map_location)
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: could not be loaded as data ({type(err).__name__}: {err})") from None


def like_parameter(param, value):
    """``value`` (a whole tensor read from a checkpoint) laid out as ``param``: this rank's slice when
    ``param`` is a DTensor (expert-parallel stacks), sliced locally without communication."""
    import torch
    from torch.distributed.tensor import distribute_tensor

    if type(param).__name__ != "DTensor" or not isinstance(value, torch.Tensor) or value.shape != param.shape:
        return value
    return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                             src_data_rank=None)
