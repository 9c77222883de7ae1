"""A disk that fails on purpose, in-process: writes to chosen file names raise what a full disk raises.

Python-level writes (``open`` for writing: JSON, safetensors, pointers) raise ``OSError(ENOSPC)``,
optionally only after some bytes were written (a file torn half-way); ``torch.save`` raises the
``RuntimeError`` that torch's C++ writer raises on a full disk; ``os.rename``/``os.replace`` of a
chosen source raise ``OSError(EIO)`` (a commit that fails).
"""

from __future__ import annotations

import builtins
import errno
import os
from contextlib import contextmanager
from pathlib import Path

import torch


class _TornFile:
    """A writable file that raises ENOSPC once ``budget`` bytes were written."""

    def __init__(self, f, budget: int, path: str):
        self._f, self._budget, self._path = f, budget, path

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self._budget:
            self._f.write(memoryview(data).cast("B")[: self._budget])
            self._budget = 0
            raise OSError(errno.ENOSPC, "No space left on device", self._path)
        self._budget -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@contextmanager
def failing_disk(*names: str, inside: str | None = None, after_bytes: int = 0, rename_of: tuple[str, ...] = ()):
    """Make writes of files called ``names`` (in a folder called ``inside``, when given; any file of
    it when no names are given) fail with a full disk, after ``after_bytes`` bytes; and renames whose
    source is called one of ``rename_of`` fail with an I/O error."""
    real_open, real_save = builtins.open, torch.save
    real_rename, real_replace = os.rename, os.replace

    def doomed(file) -> bool:
        if not isinstance(file, (str, os.PathLike)):
            return False
        path = Path(os.fspath(file))
        if inside is not None and inside not in path.parts:
            return False
        return path.name in names or (inside is not None and not names)

    def fake_open(file, mode="r", *args, **kwargs):
        if doomed(file) and any(c in mode for c in "wax"):
            if not after_bytes:
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
            return _TornFile(real_open(file, mode, *args, **kwargs), after_bytes, str(file))
        return real_open(file, mode, *args, **kwargs)

    def fake_save(obj, f, *args, **kwargs):
        if doomed(f):
            raise RuntimeError(f"[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: "
                               f"PytorchStreamWriter failed writing file data/0: file write failed ({f}: "
                               "No space left on device)")
        return real_save(obj, f, *args, **kwargs)

    def guarded(real):
        def rename(src, dst, *args, **kwargs):
            if Path(os.fspath(src)).name in rename_of:
                raise OSError(errno.EIO, "Input/output error", os.fspath(src))
            return real(src, dst, *args, **kwargs)
        return rename

    builtins.open, torch.save = fake_open, fake_save
    os.rename, os.replace = guarded(real_rename), guarded(real_replace)
    try:
        yield
    finally:
        builtins.open, torch.save = real_open, real_save
        os.rename, os.replace = real_rename, real_replace
