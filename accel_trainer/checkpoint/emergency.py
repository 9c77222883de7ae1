"""Stop requests from signals (SIGTERM, SIGINT, SIGUSR1: what SLURM and Ctrl-C send before a kill).

A handler only sets a flag; the trainer checks it between steps, where the state is consistent, and
saves an emergency checkpoint. With several processes the flag is agreed on with a tiny all-reduce over
a CPU (gloo) group, so every rank stops at the same step even if only one got the signal, and no
GPU sync is added. A second SIGINT restores Python's default (KeyboardInterrupt) to force-quit.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))


class StopRequest:
    def __init__(self, num_processes: int):
        self.signum: int | None = None
        self._previous = {}
        self._group = None
        if num_processes > 1 and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "stop request"

    def agreed(self) -> bool:
        """True on every rank when any rank got a stop signal (collective when several processes)."""
        if self._group is None:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())
