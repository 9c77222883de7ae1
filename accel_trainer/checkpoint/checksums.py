"""The checksum of every checkpoint file: xxh3-128 (a fast non-cryptographic hash; it finds damage,
not tampering by someone who also rewrites the manifest and marker)."""

from __future__ import annotations

import os
from pathlib import Path

import xxhash

HASH = "xxh3_128"
CHUNK = 64 << 20


def new_hasher():
    return xxhash.xxh3_128()


def hash_file(path: str | Path) -> str:
    hasher = new_hasher()
    with open(path, "rb", buffering=0) as f:
        # Sized to the file: most checkpoint files are small JSON, and zeroing a 64 MiB buffer for
        # each cost more than hashing them.
        buf = bytearray(min(CHUNK, max(1, os.fstat(f.fileno()).st_size)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            hasher.update(view[:n])
    return hasher.hexdigest()


class StoredFile:
    """A file to be, as the bytes :meth:`chunks` yields: ``write`` streams them to disk; ``digest``
    hashes the same bytes from memory, so it can run in a thread while the disk flush (fsync, which
    releases the GIL) is in progress."""

    def chunks(self):
        raise NotImplementedError

    def write(self, path: str | Path, fsync: bool = True) -> None:
        with open(path, "wb", buffering=0) as f:
            for chunk in self.chunks():
                f.write(chunk)
            if fsync:
                os.fsync(f.fileno())

    def digest(self) -> str:
        hasher = new_hasher()
        for chunk in self.chunks():
            hasher.update(chunk)
        return hasher.hexdigest()
