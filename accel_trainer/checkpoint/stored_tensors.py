"""A checkpoint's tensor files as they are stored, plain (safetensors) or compressed (ztensors),
behind one reader: resume, inference, export, inspect and diff read either without asking which.

:func:`read_verified` reads a file once, front to back, hashing the bytes as they arrive: a resume
costs one read of each tensor file instead of a checksum pass and then the load, and a damaged file
is still refused (:class:`~accel_trainer.errors.DamagedFile`) before training starts.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from ..errors import DamagedFile
from .checksums import new_hasher
from .format import COMPRESSED_SUFFIX
from .io import CheckpointError, read_tensor_header
from .ztensors import ZstdTensorReader, shapes_and_sizes

# torch is imported where tensors are made: the header readers serve `accel-trainer inspect`/`list`,
# which never import it.


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

    def get_tensor(self, name: str):
        return self._file.get_tensor(name)

    def get_all(self) -> dict:
        return {name: self._file.get_tensor(name) for name in self._file.keys()}


def open_tensor_file(path: str | Path, device: str = "cpu"):
    """A reader of a checkpoint's tensor file, plain (safetensors) or compressed (ztensors):
    ``keys()``, ``shape(name)``, ``get_tensor(name)``, ``get_all()``; a context manager."""
    if str(path).endswith(COMPRESSED_SUFFIX):
        return ZstdTensorReader(path, device)
    return _SafetensorsReader(path, device)


def read_tensor_file(path: str | Path, device: str = "cpu") -> dict:
    """Every tensor of a plain or compressed tensor file."""
    with open_tensor_file(path, device) as reader:
        return reader.get_all()


def tensor_header(path: str | Path) -> dict:
    """``{name: {"dtype", "shape", "nbytes"}}`` of a plain or compressed tensor file, no tensor read.

    Raises:
        CheckpointError: an unreadable header.
    """
    if str(path).endswith(COMPRESSED_SUFFIX):
        return shapes_and_sizes(path)
    try:
        return {k: {"dtype": v["dtype"], "shape": v["shape"], "nbytes": v["data_offsets"][1] - v["data_offsets"][0]}
                for k, v in read_tensor_header(path).items() if k != "__metadata__"}
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors header ({type(err).__name__}: {err})") from None


def stored_metadata(path: str | Path) -> dict:
    """The ``__metadata__`` of a plain or compressed tensor file (its header only is read); {} when
    the header cannot be read."""
    try:
        return read_tensor_header(path).get("__metadata__") or {}
    except CheckpointError:
        return {}


def _read_exactly(f, view: memoryview, path: Path) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise DamagedFile(f"{path}: truncated (ends {len(view) - got} bytes early; the file changed after it "
                              "was saved)")
        got += n


def _in_a_thread(produce, ahead: int = 4):
    """The items ``produce(put)`` puts, produced by a thread of their own at most ``ahead`` items
    ahead of the consumer; its exception is raised here. Closing the generator stops the thread."""
    import queue
    import threading

    items, stop, done = queue.Queue(maxsize=ahead), threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            produce(put)
            put(done)
        except BaseException as err:  # handed to the consumer
            put(err)

    thread = threading.Thread(target=run, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _verified_safetensors(path: Path, digest: str, device: str, into=None):
    import torch

    from .tensor_files import DTYPES

    codes = {code: dtype for dtype, code in DTYPES.items()}
    hasher = new_hasher()
    with open(path, "rb", buffering=0) as f:
        prefix = bytearray(8)
        _read_exactly(f, memoryview(prefix), path)
        (length,) = struct.unpack("<Q", prefix)
        if length > min(1 << 30, os.fstat(f.fileno()).st_size):
            raise DamagedFile(f"{path}: header length {length} does not fit the file (damaged)")
        blob = bytearray(length)
        _read_exactly(f, memoryview(blob), path)
        hasher.update(prefix)
        hasher.update(blob)
        try:
            header = json.loads(bytes(blob))
            entries = sorted((info["data_offsets"], name, info) for name, info in header.items()
                             if name != "__metadata__")
            for _, name, info in entries:
                if codes.get(info.get("dtype")) is None:
                    raise ValueError(f"tensor {name!r} has unknown dtype {info.get('dtype')!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise DamagedFile(f"{path}: unreadable header ({type(err).__name__}: {err})") from None

        def read_all(put):  # the reader thread: the disk stays busy while the consumer hashes and copies
            at = 0
            for (start, end), name, info in entries:
                shape, dtype = info["shape"], codes[info["dtype"]]
                out = into(name, shape, dtype) if into is not None else None
                out = torch.empty(shape, dtype=dtype) if out is None else out
                size = out.numel() * out.element_size()
                if start != at or end - start != size:
                    raise DamagedFile(f"{path}: tensor {name!r} is not where the header says or not of its "
                                      "shape's size (damaged)")
                view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if size else memoryview(b"")
                _read_exactly(f, view, path)  # straight into the tensor's memory: no second copy
                at = end
                if not put((name, out, view)):
                    return

        for name, out, view in _in_a_thread(read_all):
            hasher.update(view)
            yield name, out if device == "cpu" else out.to(device)
        while tail := f.read(1 << 20):  # nothing, in a file as saved; hashed so damage there is found too
            hasher.update(tail)
    if hasher.hexdigest() != digest:
        raise DamagedFile(f"{path}: checksum mismatch (the file changed after it was saved)")


def read_verified(path: str | Path, digest: str, device: str = "cpu", into=None):
    """``(name, tensor)`` of every tensor of a plain or compressed tensor file, in the order they are
    stored, reading the file once and hashing it meanwhile.

    ``into(name, shape, dtype)`` may give the CPU tensor (contiguous, of that shape and dtype) to read
    a plain file's tensor straight into, say the parameter it is for (None: a new tensor).

    The checksum is compared after the last tensor: a caller must not keep what it used of this file
    when the loop ends with :class:`~accel_trainer.errors.DamagedFile` (a resume falls back to an
    older checkpoint, which it loads whole).

    Raises:
        DamagedFile: the bytes read are not those saved (checksum ``digest``), or the file is truncated.
    """
    path = Path(path)
    if str(path).endswith(COMPRESSED_SUFFIX):
        try:
            reader = ZstdTensorReader(path, device)
        except CheckpointError as err:  # a header that does not parse: the file is not the one saved
            raise DamagedFile(str(err)) from None
        with reader:
            yield from reader.iter_verified(digest)
        return
    yield from _verified_safetensors(path, digest, device, into)
