"""One run per output dir: an exclusive lock held by the main process for the whole run.

Two runs writing one output dir destroy each other silently (each overwrites the other's step
folders, metrics and temporary folders). The lock is ``fcntl.flock`` on ``<output_dir>/.lock``: the
kernel releases it when its holder dies, however it dies, so a lock left by a crashed run never
blocks the next one. The file records who holds it (host, pid, start time, command) for the message
a second run gets.

What is protected and what is not: flock works between processes of one machine, and between
machines on NFSv4 and GPFS. On a file system without locks (Lustre mounted without ``-o flock``,
some FUSE mounts) flock fails with an error other than "held"; the run then goes on with a warning
that two runs there would not be detected. Readers (``accel-trainer list/verify/inspect``,
``load_model_for_inference``) never take the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

from ..secrets import redact_argv, redact_text
from .format import RUN_LOCK
from .io import CheckpointError

_HELD: dict[Path, "RunLock"] = {}  # this process's locks: taking one again is a no-op, not a conflict


class RunLock:
    """The lock of one output dir; :meth:`acquire` it, :meth:`release` it (or let the process end)."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / RUN_LOCK
        self._fd: int | None = None
        self._count = 0

    @classmethod
    def acquire(cls, output_dir: str | Path) -> "RunLock":
        """Take the lock of ``output_dir`` (made if missing), or raise naming the run that holds it.

        Raises:
            CheckpointError: another process holds it.
        """
        key = Path(output_dir).resolve()
        lock = _HELD.get(key)
        if lock is None:
            lock = cls(output_dir)
            lock._take()
            _HELD[key] = lock
        lock._count += 1
        return lock

    def _take(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # it describes a command: its owner's only
        except OSError as err:
            raise CheckpointError(f"{self.output_dir}: cannot create the run's lock file ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"{self.output_dir} is in use by another run ({self.holder()}); wait for it "
                                      "to end or pass another --output_dir") from None
            warnings.warn(f"{self.path}: this file system does not support locks ({err.strerror}); a second run "
                          "started on the same output dir would not be detected", stacklevel=3)
            return
        self._fd = fd
        info = {"host": platform.node(), "pid": os.getpid(), "started_unix": time.time(),
                "command": " ".join(redact_argv(sys.argv))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, as its file says."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started_unix"]))
            return f"pid {info['pid']} on host {info['host']}, started {started}: {redact_text(info['command'])}"
        except (OSError, ValueError, KeyError, TypeError):
            return f"see {self.path}"

    def release(self) -> None:
        """Give the lock back once every :meth:`acquire` of this process has released it."""
        self._count -= 1
        if self._count > 0:
            return
        _HELD.pop(self.output_dir.resolve(), None)
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def lock_run_dir(accelerator, output_dir: str | Path) -> RunLock | None:
    """Take the output dir's lock on the main process; every process raises if it is held (a
    collective call). Returns the lock on the main process, None on the others.

    Raises:
        CheckpointError: naming the run that holds it.
    """
    from accelerate.utils import broadcast_object_list

    lock, answer = None, [None]
    if accelerator.is_main_process:
        try:
            lock = RunLock.acquire(output_dir)
        except CheckpointError as err:
            answer = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if answer[0]:
        raise CheckpointError(answer[0])
    return lock
