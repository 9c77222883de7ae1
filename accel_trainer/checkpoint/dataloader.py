"""A dataloader that remembers its position, so a resumed run continues with the next batch.

Accelerate does not restore where a run was inside an epoch (its ``load_state`` restores the RNG,
not the iteration), and ``skip_first_batches`` hands back a new loader that the loop must know to
use. :class:`ResumableLoader` wraps the prepared loader once: iterating it is iterating the loader,
and its ``state_dict()`` is the position, which ``load_state_dict()`` turns into "skip what was
consumed" at the next pass, at the index level (no skipped batch is loaded).

The position is global: the epoch, and the samples of that epoch consumed by all processes
together. Accelerate deals batches of one global order round-robin to the processes, so the same
number means the same place on any number of processes.

The order must be the same when the epoch is replayed: a sampler whose order is a function of the
epoch (``set_epoch``: Accelerate's seedable sampler, ``DistributedSampler``, a sequential order) or
one driven by its own ``generator``, whose state at the start of the epoch is saved and restored.
A sampler with ``set_start(samples)`` (the trainer's) starts the next pass there directly: O(1).
A ``RandomSampler`` without a generator (it would draw from the global RNG each epoch) is given
one, seeded from ``torch.initial_seed()``.

Nothing here draws from the global RNG, so a resumed loop's dropout sees the numbers an
uninterrupted one would: a DataLoader without a ``generator`` draws its workers' base seed from the
global RNG each time an iterator is made (after a resume, at a point where the uninterrupted run
drew nothing), so the loader is given a generator of its own, seeded by the epoch.
"""

from __future__ import annotations

import base64

import torch
from torch.utils.data import RandomSampler


def _sampler_of(loader):
    """The index sampler inside a (prepared) loader: under several processes Accelerate wraps the
    batch sampler in a ``BatchSamplerShard``, whose inner batch sampler holds it."""
    from accelerate.data_loader import get_sampler

    try:
        sampler = get_sampler(loader)
    except AttributeError:  # an iterable-style loader has no sampler
        return None
    if sampler is None:
        inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
        sampler = getattr(inner, "sampler", None)
    return sampler


def position_to_skip(samples_in_epoch: int, global_batch_size: int) -> tuple[int, int]:
    """Batches each process skips to reach a global sample position, and the samples left over.

    Accelerate deals the batches of one global order round-robin, so after ``s`` batches per process
    exactly ``s * global_batch_size`` samples of the order are consumed, on any world size. A
    leftover (a position that is not a multiple of this run's global batch) is read again: a partial
    batch cannot be skipped.
    """
    return divmod(samples_in_epoch, global_batch_size)


def _encode(state: torch.Tensor | None) -> str | None:
    return None if state is None else base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode(text: str | None) -> torch.Tensor | None:
    return None if text is None else torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class ResumableLoader:
    """Iterate a (prepared) dataloader epoch after epoch with a position that survives a restart.

    Each ``iter()`` is one pass over the current epoch from the current position; a pass that runs
    to the end moves to the next epoch. ``len()``, attributes and ``set_epoch`` are the loader's.

    Args:
        loader: a DataLoader, usually the one ``accelerator.prepare`` returned.

    Attributes:
        epoch: the epoch the next batch comes from.
        samples_in_epoch: samples of ``epoch`` already handed out, summed over all processes.
        notes: what the last ``load_state_dict`` had to adjust (e.g. a partial batch read again).
    """

    def __init__(self, loader):
        self.loader = loader
        self.epoch = 0
        self.samples_in_epoch = 0
        self.notes: list[str] = []
        self._epoch_start_state: torch.Tensor | None = None
        sampler = _sampler_of(loader)
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = torch.Generator().manual_seed(torch.initial_seed())
        # Making an iterator draws the workers' base seed from the loader's generator, or from the
        # global RNG when it has none: give it one (its draws then depend on the epoch alone).
        self._iter_seed = None
        if hasattr(loader, "generator") and getattr(loader, "generator", None) is None:
            try:
                loader.generator = torch.Generator()
                self._iter_seed = torch.initial_seed()
            except (AttributeError, ValueError):  # a loader that refuses the attribute: said at resume
                pass
        self._generator = getattr(sampler, "generator", None)
        self._sampler = sampler

    @property
    def global_batch_size(self) -> int:
        """Samples one step of this loader hands out over all processes."""
        return getattr(self.loader, "total_batch_size", None) or self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":  # not set yet (e.g. during unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property
    def starts_anywhere(self) -> bool:
        """Whether the sampler can begin a pass at any sample (``set_start``): then a resume skips
        nothing, in O(1), and a position between batches needs no re-reading."""
        return hasattr(self._sampler, "set_start")

    def batches_left(self) -> int:
        """Batches of the current epoch this process has not seen yet."""
        if self.starts_anywhere:
            return max(0, (len(self._sampler) - self.samples_in_epoch) // self.global_batch_size)
        return max(0, len(self.loader) - position_to_skip(self.samples_in_epoch, self.global_batch_size)[0])

    def __iter__(self):
        skip, _ = position_to_skip(self.samples_in_epoch, self.global_batch_size)
        if self._generator is not None:
            if self.samples_in_epoch == 0:
                self._epoch_start_state = self._generator.get_state()
            elif self._epoch_start_state is not None:  # replay this epoch's order
                self._generator.set_state(self._epoch_start_state)
        if self._iter_seed is not None:
            self.loader.generator.manual_seed(self._iter_seed + self.epoch)
        loader = self.loader
        if self.starts_anywhere:
            self._sampler.set_start(self.samples_in_epoch)
        elif skip:
            from accelerate import skip_first_batches

            loader = skip_first_batches(self.loader, skip)
        self._set_epoch(loader)
        for batch in loader:
            self.samples_in_epoch += self.global_batch_size
            yield batch
        self.end_epoch()

    def end_epoch(self) -> None:
        """Move to the start of the next epoch (what a finished pass does; call it to drop the rest)."""
        self.epoch += 1
        self.samples_in_epoch = 0
        self._epoch_start_state = None

    def _set_epoch(self, loader) -> None:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        elif hasattr(self._sampler, "set_epoch"):
            self._sampler.set_epoch(self.epoch)

    def state_dict(self) -> dict:
        # The generator state the current epoch's order comes from: its start state once the epoch
        # has begun, else the state now (the next pass draws from it).
        start = self._epoch_start_state
        if start is None and self._generator is not None:
            start = self._generator.get_state()
        return {"epoch": self.epoch, "samples_in_epoch": self.samples_in_epoch,
                "global_batch_size": self.global_batch_size, "epoch_generator_state": _encode(start)}

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state``'s position on the next pass; a position that is not a whole number of
        this run's global batches (another batch size or world size) re-reads the partial batch."""
        self.notes = []
        self.epoch = int(state["epoch"])
        samples = int(state["samples_in_epoch"])
        _, remainder = position_to_skip(samples, self.global_batch_size)
        if self.starts_anywhere:
            remainder = 0
        if remainder:
            self.notes.append(f"data position: {samples} samples into epoch {self.epoch} is not a multiple of "
                              f"this run's global batch of {self.global_batch_size}; the last {remainder} "
                              "sample(s) are read again")
        self.samples_in_epoch = samples - remainder
        if getattr(self.loader, "generator", True) is None:
            self.notes.append("this loader draws from the global random generator when it starts an epoch (it has "
                              "no generator= of its own): random ops in the loop after this resume (dropout) may "
                              "differ from an uninterrupted run's; give the DataLoader a generator to make it exact")
        saved = _decode(state.get("epoch_generator_state"))
        if saved is not None and self._generator is not None:
            self._generator.set_state(saved)
        self._epoch_start_state = saved if self.samples_in_epoch else None


def has_own_position(loader) -> bool:
    """A loader that saves its position itself (torchdata's StatefulDataLoader, Accelerate's adapter
    built with ``use_stateful_dataloader``, a :class:`ResumableLoader`); others get wrapped."""
    from accelerate.data_loader import DataLoaderAdapter

    if isinstance(loader, DataLoaderAdapter):  # always has state_dict(), meaningful only when stateful
        return bool(getattr(loader, "use_stateful_dataloader", False))
    return hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
