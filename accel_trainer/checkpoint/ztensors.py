"""Lossless compressed tensor files (``*.ztensors``): zstd over bytes grouped by their position in
each element, in chunks compressed and decompressed by parallel threads.

Why grouped: the bytes of a float differ in how random they are. The sign/exponent byte of fp32 or
bf16 weights takes few values; the low mantissa bytes are close to noise. Interleaved (as in memory)
zstd sees mostly noise; grouped (every element's byte 0, then every byte 1, ...) the exponent bytes form
long runs it compresses well (the idea of ZipNN and of nvCOMP's bitcomp). The file is lossless: a
tensor read back is bitwise the one written.

Layout (little-endian)::

    8 bytes   N: length of the JSON header
    N bytes   {"format": "accel_trainer.ztensors/1", "codec": "zstd", "level": L,
               "tensors": {name: {"dtype": "F32", "shape": [...], "chunks": [[offset, stored, raw], ...]}},
               "__metadata__": {...}}   (padded with spaces to a multiple of 8)
    data      the chunks, each one zstd frame of ``raw`` grouped bytes; offsets from the data start

The checkpoint's checksum is over the stored (compressed) bytes, so ``verify`` reads no more than the
file. The header is read without torch (``accel-trainer inspect``/``list``).
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .checksums import StoredFile
from .io import CheckpointError, read_tensor_header

FORMAT = "accel_trainer.ztensors/1"
SUFFIX = ".ztensors"
# Raw bytes per chunk: the unit of parallel work and of the memory one thread holds.
CHUNK_BYTES = 4 << 20
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def default_threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def read_header(path: str | Path) -> dict:
    """The JSON header (tensor names, dtypes, shapes, chunk table), without reading tensor data.

    Raises:
        CheckpointError: not a ztensors file, or a damaged header.
    """
    header = read_tensor_header(path)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, this accel_trainer reads {FORMAT!r}")
    return header


def shapes_and_sizes(path: str | Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "nbytes"}}`` of every tensor (raw bytes, as in memory)."""
    return {name: {"dtype": info["dtype"], "shape": info["shape"], "nbytes": sum(c[2] for c in info["chunks"])}
            for name, info in read_header(path)["tensors"].items()}


def _grouped(raw, itemsize: int):
    """``raw`` (a uint8 numpy view of elements of ``itemsize`` bytes) with byte k of every element together."""
    if itemsize == 1:
        return raw
    return raw.reshape(-1, itemsize).T.copy()


def _ungroup_into(grouped, out, itemsize: int) -> None:
    if itemsize == 1:
        out[:] = grouped
        return
    # One contiguous plane at a time into a strided column: ~13x faster than one transposed copy,
    # which reads with a stride as long as a plane.
    planes, elements = grouped.reshape(itemsize, -1), out.reshape(-1, itemsize)
    for k in range(itemsize):
        elements[:, k] = planes[k]


class ZstdTensorFile(StoredFile):
    """A ztensors file to be, compressed on construction (in ``threads`` threads; zstd and the byte
    regrouping run outside the GIL). ``write`` and ``digest`` then work on the stored bytes."""

    def __init__(self, tensors: dict, metadata: dict[str, str] | None = None, level: int = 3,
                 threads: int | None = None):
        import zstandard

        from .tensor_files import DTYPES, _as_bytes  # torch: not needed to read a header

        jobs, table = [], {}
        for name, tensor in tensors.items():
            if tensor.dtype not in DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which cannot be stored")
            dtype = DTYPES[tensor.dtype]
            itemsize = ITEM_SIZES[dtype]
            raw = _as_bytes(tensor).cast("B")
            step = max(itemsize, CHUNK_BYTES // itemsize * itemsize)
            table[name] = {"dtype": dtype, "shape": list(tensor.shape), "chunks": []}
            for start in range(0, len(raw), step):
                jobs.append((name, raw[start: start + step], itemsize))
            if len(raw) == 0:
                table[name]["chunks"] = []
        import numpy as np

        def compress(job):
            name, view, itemsize = job
            compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
            return compressor.compress(_grouped(np.frombuffer(view, dtype=np.uint8), itemsize))

        with ThreadPoolExecutor(max_workers=threads or default_threads(), thread_name_prefix="zstd") as pool:
            frames = list(pool.map(compress, jobs))
        offset = 0
        for (name, view, _), frame in zip(jobs, frames):
            table[name]["chunks"].append([offset, len(frame), len(view)])
            offset += len(frame)
        header = {"format": FORMAT, "codec": "zstd", "level": level, "tensors": table}
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.prefix = struct.pack("<Q", len(blob)) + blob
        self.frames = frames
        self.raw_bytes = sum(len(view) for _, view, _ in jobs)
        self.stored_bytes = len(self.prefix) + offset

    def chunks(self):
        yield memoryview(self.prefix)
        for frame in self.frames:
            yield memoryview(frame)


class ZstdTensorReader:
    """Read tensors of a ztensors file one at a time (like ``safetensors.safe_open``): ``keys()``,
    ``get_tensor(name)``, ``shape(name)``. Chunks are decompressed by parallel threads straight into
    the tensors' memory."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None):
        self.path = Path(path)
        header = read_header(self.path)
        self.tensors = header["tensors"]
        self.metadata = header.get("__metadata__") or {}
        self.device = device
        self.threads = threads or default_threads()
        self._file = open(self.path, "rb", buffering=0)
        self.data_start = 8 + struct.unpack("<Q", os.pread(self._file.fileno(), 8, 0))[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def _plan(self, name: str):
        """An empty tensor for ``name`` and the decompression jobs that fill it."""
        import numpy as np
        import torch

        from .tensor_files import DTYPES

        info = self.tensors[name]
        codes = {code: d for d, code in DTYPES.items()}
        if info.get("dtype") not in codes:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unknown dtype {info.get('dtype')!r}")
        itemsize = ITEM_SIZES[info["dtype"]]
        out = torch.empty(info["shape"], dtype=codes[info["dtype"]])
        flat = out.reshape(-1).view(torch.uint8).numpy() if out.numel() else np.empty(0, dtype=np.uint8)
        jobs, at = [], 0
        for offset, stored, raw in info["chunks"]:
            jobs.append((name, offset, stored, raw, flat[at: at + raw], itemsize))
            at += raw
        if at != flat.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r} holds {at} bytes, its shape needs {flat.nbytes}")
        return out, jobs

    def _decompress(self, job, frame: bytes | None = None) -> None:
        import numpy as np
        import zstandard

        name, offset, stored, raw, into, itemsize = job
        if frame is None:
            frame = os.pread(self._file.fileno(), stored, self.data_start + offset)
        if len(frame) != stored:
            raise CheckpointError(f"{self.path}: truncated (tensor {name!r})")
        try:
            data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=raw)
        except zstandard.ZstdError as err:
            raise CheckpointError(f"{self.path}: tensor {name!r} does not decompress ({err})") from None
        if len(data) != raw:
            raise CheckpointError(f"{self.path}: tensor {name!r}: a chunk of {len(data)} bytes, expected {raw}")
        _ungroup_into(np.frombuffer(data, dtype=np.uint8), into, itemsize)

    def _run(self, jobs) -> None:
        if len(jobs) <= 1:
            for job in jobs:
                self._decompress(job)
            return
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="unzstd") as pool:
            list(pool.map(self._decompress, jobs))

    def get_tensor(self, name: str):
        out, jobs = self._plan(name)
        self._run(jobs)
        return out if self.device == "cpu" else out.to(self.device)

    def iter_tensors(self, names, ahead: int | None = None):
        """``(name, tensor)`` for ``names`` in order, the next ``ahead`` tensors decompressing in the
        threads meanwhile: parallel like :meth:`get_all`, with at most ``ahead`` tensors held at once."""
        from collections import deque

        names = list(names)
        ahead = ahead or 2 * self.threads
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="unzstd") as pool:
            pending = deque()
            for i, name in enumerate(names):
                while len(pending) < ahead and i + len(pending) < len(names):
                    upcoming = names[i + len(pending)]
                    out, jobs = self._plan(upcoming)
                    pending.append((upcoming, out, [pool.submit(self._decompress, job) for job in jobs]))
                done_name, out, futures = pending.popleft()
                for future in futures:
                    future.result()
                yield done_name, out if self.device == "cpu" else out.to(self.device)

    def iter_verified(self, digest: str, ahead: int | None = None):
        """``(name, tensor)`` of every tensor in stored order. This thread reads the stored bytes once,
        front to back, hashing them as they come, and hands each chunk to the threads to decompress.

        Raises:
            DamagedFile: after the last tensor when the bytes read are not those saved (``digest``),
                or at once when a chunk does not decompress or the file is truncated.
        """
        from collections import deque

        from ..errors import DamagedFile
        from .checksums import new_hasher

        hasher = new_hasher()
        f = self._file
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        f.seek(0)
        hasher.update(f.read(self.data_start))
        order = sorted(self.tensors, key=lambda n: self.tensors[n]["chunks"][0][0] if self.tensors[n]["chunks"] else -1)
        ahead = ahead or 2 * self.threads
        at = 0
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="unzstd") as pool:
            pending = deque()

            def finish_one():
                done_name, out, futures = pending.popleft()
                try:
                    for future in futures:
                        future.result()
                except CheckpointError as err:
                    raise DamagedFile(str(err)) from None
                return done_name, out if self.device == "cpu" else out.to(self.device)

            for name in order:
                out, jobs = self._plan(name)
                futures = []
                for job in jobs:
                    offset, stored = job[1], job[2]
                    frame = f.read(stored) if offset == at else b""
                    if len(frame) != stored:
                        raise DamagedFile(f"{self.path}: tensor {name!r} is not where the header says, or the "
                                          "file is truncated (damaged)")
                    hasher.update(frame)
                    at += stored
                    futures.append(pool.submit(self._decompress, job, frame))
                pending.append((name, out, futures))
                if len(pending) > ahead:
                    yield finish_one()
            while pending:
                yield finish_one()
        while tail := f.read(1 << 20):
            hasher.update(tail)
        if hasher.hexdigest() != digest:
            raise DamagedFile(f"{self.path}: checksum mismatch (the file changed after it was saved)")

    def get_all(self) -> dict:
        """Every tensor, all chunks of all tensors decompressed in one pool of threads."""
        planned = {name: self._plan(name) for name in self.keys()}
        self._run([job for _, jobs in planned.values() for job in jobs])
        return {name: out if self.device == "cpu" else out.to(self.device) for name, (out, _) in planned.items()}


def load_file(path: str | Path, device: str = "cpu") -> dict:
    """Every tensor of a ztensors file (as ``safetensors.torch.load_file``)."""
    with ZstdTensorReader(path, device) as reader:
        return reader.get_all()
