"""One protocol for the places checkpoints live: a local folder and an object store.

Both tiers hold the same layout (``checkpoints/step-N/`` + ``latest``/``best`` pointer files) and
answer the same verbs; what differs is how a write becomes visible (a local rename, an ordered
sequence of object writes). Retention, "latest valid", the ``list``/``verify``/``prune`` commands
are written once against :class:`CheckpointStorage` and so cannot drift apart between tiers
(torchtitan's ``CheckpointStorage`` is the model).
"""

from __future__ import annotations

import math
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol

from .format import COMPLETE, DATALOADER, MANIFEST, POINTERS, STEP_RE, TMP_PREFIX, WEIGHTS_ONLY, state_file
from .io import CheckpointError, read_json


def step_number(name: str) -> int:
    """The step of a ``step-N`` name (the one place the name is parsed)."""
    return int(STEP_RE.match(name).group(1))


def select_for_deletion(steps: list[int], *, keep_last: int | None, protected: set[int],
                        keep_every_n_steps: int | None = None) -> list[int]:
    """Retention rule: keep the ``keep_last`` most recent saves, every protected step (latest, best)
    and every multiple of ``keep_every_n_steps``; return the steps to delete, by step.

    Args:
        steps: the checkpoints' steps in the order they were saved, oldest first.
    """
    if not keep_last:
        return []
    newest = set(steps[-keep_last:])
    keep = newest | protected
    if keep_every_n_steps:
        keep |= {s for s in steps if s % keep_every_n_steps == 0}
    return sorted(s for s in steps if s not in keep)


class WritableTier(Protocol):
    """The verbs a tier that receives committed checkpoints answers (the object store), in the order
    an upload uses them: ``begin`` (its old ``COMPLETE`` goes first), ``put`` (data files, by any
    number of ranks), ``commit`` (sizes checked, then manifest, then ``COMPLETE``), and ``download``
    (back into a local folder, verified). The :class:`~.remote.Uploader` speaks only these."""

    def begin(self, name: str) -> None: ...

    def put(self, folder: Path, files: list[str]) -> int: ...

    def commit(self, folder: Path) -> None: ...

    def download(self, name: str, dest_root: Path, progress: bool = True) -> Path: ...


class CheckpointStorage(ABC):
    """The verbs a checkpoint tier answers; names are ``step-N`` folder names, never paths."""

    #: Where a checkpoint whose manifest cannot be read sorts by recency. Locally it comes first
    #: (whoever verifies candidates reports it, retention keeps it); remotely last (never trusted).
    UNREADABLE_SEQUENCE: float = math.inf

    @abstractmethod
    def display(self, *parts: str) -> str:
        """A human-readable location of ``checkpoints/<parts>`` (no credentials)."""

    @abstractmethod
    def read_pointer(self, name: str) -> str | None:
        """The ``step-N`` a pointer (``latest``/``best``) names, or None (absent or unreadable)."""

    @abstractmethod
    def write_pointer(self, name: str, step_name: str) -> None:
        """Point ``name`` at ``step_name`` atomically (a reader sees the old or the new target)."""

    @abstractmethod
    def listing(self) -> dict[str, dict[str, int]]:
        """Every ``step-N`` (complete or not) -> {relative file name: size in bytes}."""

    @abstractmethod
    def read_bytes(self, step_name: str, file: str) -> bytes:
        """One file of a checkpoint (FileNotFoundError when absent)."""

    @abstractmethod
    def problems(self, step_name: str, files: dict[str, int] | None = None,
                 checksums: bool | set[str] = False) -> tuple[list[str], dict | None]:
        """What makes ``step_name`` untrustworthy (empty: valid), and its manifest."""

    @abstractmethod
    def delete(self, step_name: str) -> None:
        """Remove a checkpoint so that no reader ever trusts a half-deleted one."""

    # ------------------------------------------------------------------ written once, for both
    def read_json(self, step_name: str, file: str) -> dict | None:
        """A JSON file of a checkpoint, or None when it is absent or does not decode."""
        import json

        try:
            value = json.loads(self.read_bytes(step_name, file))
        except (OSError, ValueError, UnicodeDecodeError, CheckpointError):
            return None
        return value if isinstance(value, dict) else None

    def manifest_or_problem(self, step_name: str) -> tuple[dict | None, str | None]:
        """The manifest of ``step_name``, or why it cannot be read."""
        manifest = self.read_json(step_name, MANIFEST)
        return (manifest, None) if manifest is not None else (None, f"{self.display(step_name, MANIFEST)}: missing or "
                                                                    f"not valid JSON")

    def sequence(self, step_name: str) -> float:
        """The order in which ``step_name`` was saved (0 for format 1, which records none)."""
        manifest = self.read_json(step_name, MANIFEST)
        value = manifest.get("sequence", 0) if manifest is not None else None
        return value if isinstance(value, int) else self.UNREADABLE_SEQUENCE

    def complete_steps(self) -> list[tuple[float, int, str]]:
        """``(sequence, step, name)`` of every checkpoint with a ``COMPLETE`` marker, newest first.

        Not by step alone: a run resumed from an older checkpoint (say ``best``, to fine-tune) saves
        lower step numbers than the abandoned ones after it, and its own saves are the latest.
        """
        found = [(self.sequence(name), step_number(name), name)
                 for name, files in self.listing().items() if COMPLETE in files]
        return sorted(found, reverse=True)

    def latest_valid(self, checksums: bool | set[str] = False) -> tuple[str | None, float | None, list[str]]:
        """The most recently saved checkpoint that verifies: (name, sequence, what was skipped and why)."""
        listing, skipped = self.listing(), []
        for sequence, _, name in self.complete_steps():
            problems, _ = self.problems(name, listing.get(name), checksums=checksums)
            if not problems:
                return name, sequence, skipped
            skipped.append(problems[0])
        return None, None, skipped

    def plan_retention(self, keep_last: int | None, keep_every_n_steps: int | None,
                       keep: set[str] = frozenset()) -> list[str]:
        """The checkpoints :func:`select_for_deletion` picks: never a ``latest``/``best`` target,
        nor one named in ``keep`` (e.g. one still uploading)."""
        if not keep_last:
            return []
        found = {step: name for _, step, name in reversed(self.complete_steps())}
        protected = {step_number(t) for t in (self.read_pointer(p) for p in POINTERS) if t}
        protected |= {step_number(n) for n in keep if STEP_RE.match(n)}
        doomed = select_for_deletion(list(found), keep_last=keep_last, protected=protected,
                                     keep_every_n_steps=keep_every_n_steps)
        return [found[s] for s in doomed]

    def apply_retention(self, keep_last: int | None, keep_every_n_steps: int | None,
                        keep: set[str] = frozenset()) -> list[str]:
        """Delete what :meth:`plan_retention` picks; returns their names."""
        doomed = self.plan_retention(keep_last, keep_every_n_steps, keep)
        for name in doomed:
            self.delete(name)
        return doomed

    def rows(self) -> list[dict]:
        """One row per ``step-N`` (complete or not), oldest first, for ``accel-trainer list``.

        A checkpoint whose metadata cannot be read gets a row with its ``problem`` instead of
        failing the list."""
        listing = self.listing()
        pointers = {p: self.read_pointer(p) for p in POINTERS}
        rows = []
        for name in sorted(listing, key=step_number):
            complete = COMPLETE in listing[name]
            row = {"name": name, "step": step_number(name), "complete": complete, "epoch": None, "metrics": {},
                   "problem": None, "size_bytes": sum(listing[name].values()),
                   "tags": [p for p, target in pointers.items() if target == name]}
            manifest = None
            if complete:
                manifest, row["problem"] = self.manifest_or_problem(name)
                row["metrics"] = (manifest or {}).get("metrics") or {}
            position = self.read_json(name, state_file(DATALOADER))
            row["epoch"] = epoch_of(position) if position else None
            if (manifest or {}).get(WEIGHTS_ONLY):
                row["tags"].append("weights-only")  # --full_state_total_limit: resumes only with --reset_optimizer
            if row["epoch"] and "epoch" in ((manifest or {}).get("reasons") or []):
                row["tags"].append(f"epoch-{row['epoch']}")  # what --resume_from_checkpoint takes
            rows.append(row)
        return rows


def epoch_of(position: dict) -> int:
    """The epoch a data position is in, counted from 1 as users count them; a position at an epoch's
    boundary (nothing read of the next) belongs to the epoch that ended, 0 before any data."""
    return int(position.get("epoch", 0)) + (1 if position.get("samples_in_epoch") else 0)


class LocalStorage(CheckpointStorage):
    """``<output_dir>/checkpoints`` on a file system: a checkpoint becomes visible by one rename,
    pointers by an atomic rename of a small file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def display(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def read_pointer(self, name: str) -> str | None:
        try:
            target = (self.root / name).read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return target if STEP_RE.match(target) else None

    def write_pointer(self, name: str, step_name: str) -> None:
        from .io import atomic_write_text

        atomic_write_text(self.root / name, step_name + "\n")

    def listing(self) -> dict[str, dict[str, int]]:
        if not self.root.is_dir():
            return {}
        out = {}
        for child in self.root.iterdir():
            if STEP_RE.match(child.name) and child.is_dir():
                out[child.name] = {str(p.relative_to(child)): p.stat().st_size for p in child.rglob("*") if p.is_file()}
        return out

    def read_bytes(self, step_name: str, file: str) -> bytes:
        return (self.root / step_name / file).read_bytes()

    def sequence(self, step_name: str) -> float:
        try:  # the manifest itself, not through read_json: a present but damaged one must sort first
            value = read_json(self.root / step_name / MANIFEST).get("sequence", 0)
        except (CheckpointError, AttributeError):
            return self.UNREADABLE_SEQUENCE
        return value if isinstance(value, int) else self.UNREADABLE_SEQUENCE

    def complete_steps(self) -> list[tuple[float, int, str]]:
        # Only the markers matter here: no need to stat every file of every checkpoint.
        if not self.root.is_dir():
            return []
        found = [(self.sequence(child.name), step_number(child.name), child.name) for child in self.root.iterdir()
                 if STEP_RE.match(child.name) and (child / COMPLETE).exists()]
        return sorted(found, reverse=True)

    def problems(self, step_name: str, files: dict[str, int] | None = None,
                 checksums: bool | set[str] = False) -> tuple[list[str], dict | None]:
        from .manifest import verify

        problems = verify(self.root / step_name, checksums=checksums)
        return problems, (None if problems else self.read_json(step_name, MANIFEST))

    def manifest_or_problem(self, step_name: str) -> tuple[dict | None, str | None]:
        from .manifest import read_manifest

        try:
            return read_manifest(self.root / step_name), None
        except CheckpointError as err:
            return None, str(err)

    def delete(self, step_name: str) -> None:
        # Rename first so a half-deleted folder never looks like a checkpoint, then delete.
        folder = self.root / step_name
        trash = self.root / f"{TMP_PREFIX}delete-{step_name}"
        folder.rename(trash)
        shutil.rmtree(trash)


__all__ = ["CheckpointStorage", "LocalStorage", "select_for_deletion", "step_number"]
