"""Write and read the big tensor files of a checkpoint at disk speed.

:class:`SafetensorsFile` streams each tensor's bytes straight from memory to the file (no pickle,
no zip, no intermediate copy) and hashes the same bytes from memory (xxh3-128, in a thread while the
disk flush runs, so the checksum costs no extra read pass). The file is standard safetensors:
anything that reads safetensors reads it. :class:`StagingBuffers` holds the copies an async save
writes from.
"""

from __future__ import annotations

import json
import math
import struct

import torch

from .checksums import CHUNK, StoredFile

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def safetensors_prefix(specs: dict[str, tuple[torch.dtype, list[int]]], metadata: dict[str, str] | None = None
                       ) -> bytes:
    """The length and JSON header of a safetensors file whose tensors (``name -> (dtype, shape)``)
    follow in this order, back to back: a file can then be written one tensor at a time."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


class SafetensorsFile(StoredFile):
    """A safetensors file to be: its header and the byte views of its tensors (no copies)."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
        self.prefix = safetensors_prefix({name: (t.dtype, list(t.shape)) for name, t in tensors.items()}, metadata)
        self.views = [_as_bytes(t) for t in tensors.values()]

    def chunks(self):
        yield memoryview(self.prefix)
        for data in self.views:
            for start in range(0, len(data), CHUNK):
                yield data[start: start + CHUNK]


class StagingBuffers:
    """CPU copies of the state for an async save, reused from save to save.

    A fresh ``clone`` is slowed by page faults; copying into buffers that were already touched runs
    at memory speed. Pinned when the source is on a GPU (faster DMA).
    """

    def __init__(self):
        self.buffers: dict[tuple[str, str], torch.Tensor] = {}

    def stage(self, file_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` (one file's worth) in this file's buffers."""
        staged = {}
        for name, src in tensors.items():
            src = src.detach()
            buf = self.buffers.get((file_name, name))
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
                self.buffers[(file_name, name)] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            staged[name] = buf
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return staged

