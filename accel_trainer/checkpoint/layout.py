"""Where checkpoints live (see :mod:`.format`), which one a name means, and which ones to keep."""

from __future__ import annotations

import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .format import CHECKPOINTS, COMPLETE, DATALOADER, LATEST, MANIFEST, POINTERS, STEP_RE, TMP_PREFIX, state_file
from .io import CheckpointError, read_json
from .manifest import verify
from .storage import LocalStorage, epoch_of, select_for_deletion  # noqa: F401 (part of this module's API)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_folders(root: str | Path) -> list[tuple[int, Path]]:
    """Every ``step-N`` folder under a ``checkpoints/`` folder, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), child) for child in root.iterdir()
                  if (m := STEP_RE.match(child.name)) and child.is_dir())


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a COMPLETE marker) under a ``checkpoints/`` folder, oldest first."""
    return [(step, folder) for step, folder in step_folders(root) if (folder / COMPLETE).exists()]


def read_pointer(root: Path, name: str) -> Path | None:
    """The folder a pointer file names, or None when it is absent, unreadable or not ``step-<N>``
    (a pointer never names anything outside ``root``)."""
    target = LocalStorage(root).read_pointer(name)
    return None if target is None else root / target


def pointer_problem(root: Path, name: str) -> str | None:
    """Why a present pointer file cannot be followed (None when it can, or is absent)."""
    path = root / name
    if not path.exists() and not path.is_symlink():
        return None
    target = read_pointer(root, name)
    if target is None:
        return f"{path} is not a readable 'step-<N>' pointer"
    if not (target / COMPLETE).is_file():
        return f"{path} names {target.name}, which is not a complete checkpoint"
    return None


def write_pointer(root: Path, name: str, folder: Path) -> None:
    LocalStorage(root).write_pointer(name, folder.name)


def describe_available(root: Path) -> str:
    steps = [p.name for _, p in list_checkpoints(root)]
    pointers = [f"{n} -> {read_pointer(root, n).name}" for n in POINTERS if read_pointer(root, n)]
    if not steps:
        return f"no complete checkpoints under {root}"
    return f"available under {root}: {', '.join(steps)}" + (f" ({'; '.join(pointers)})" if pointers else "")


@dataclass
class Resolved:
    path: Path | None
    note: str = ""


def by_recency(root: Path) -> list[Path]:
    """Complete checkpoints, most recently saved first (see :meth:`CheckpointStorage.complete_steps`).
    One whose manifest cannot be read comes first, so that whoever verifies the candidates reports it."""
    return [root / name for _, _, name in LocalStorage(root).complete_steps()]


def next_sequence(root: Path) -> int:
    storage = LocalStorage(root)
    sequences = (storage.sequence(folder.name) for _, folder in list_checkpoints(root))
    return 1 + max((s if s != storage.UNREADABLE_SEQUENCE else 0 for s in sequences), default=0)


def resolve_latest_valid(root: Path, checksums: bool | set[str] = True) -> Resolved:
    """The most recently saved checkpoint that verifies; when that is not the one the ``latest``
    pointer names, or newer ones fail verification, a warning says what was skipped and why.
    Never raises for damaged checkpoints or pointers."""
    rejected = []
    problem = pointer_problem(root, LATEST)
    if problem:
        rejected.append(problem)
    failed = set()
    for folder in by_recency(root):
        problems = verify(folder, checksums=checksums)
        if not problems:
            pointed = read_pointer(root, LATEST)
            if pointed is not None and pointed != folder and not problem and pointed not in failed:
                rejected.append(f"the 'latest' pointer names the older {pointed.name} (moving it after the save "
                                f"of {folder.name} did not happen)")
            note = ""
            if rejected:
                note = f"'latest' falls back to {folder.name}: skipped " + "; ".join(rejected)
                warnings.warn(note, stacklevel=2)
            return Resolved(folder, note)
        failed.add(folder)
        rejected.append(f"{folder.name}: {problems[0]}")
    return Resolved(None, "; ".join(rejected))


EPOCH_RE = re.compile(r"^epoch-(\d+)$")


def epoch_end_checkpoint(root: Path, epoch: int) -> Path | None:
    """The checkpoint saved when epoch ``epoch`` (counted from 1) ended (``--save_on_each_epoch``):
    saved for the reason ``epoch``, its data position at the end of the ``epoch - 1``-th pass (from 0)."""
    for _, folder in reversed(list_checkpoints(root)):
        try:
            manifest = read_json(folder / MANIFEST)
            position = read_json(folder / state_file(DATALOADER))
        except (CheckpointError, OSError):
            continue
        if "epoch" not in (manifest.get("reasons") or []):
            continue
        if epoch_of(position) == epoch:
            return folder
    return None


def resolve(spec: str, output_dir: str | Path, checksums: bool | set[str] = True) -> Resolved:
    """Turn ``--resume_from_checkpoint`` into a verified checkpoint folder.

    Args:
        spec: ``latest``, ``best``, ``step-<N>``, ``epoch-<N>`` (saved when epoch N ended, from 1), or a
            path (a ``step-N`` folder, a run's output dir meaning its latest, or ``<output_dir>/best``).
        output_dir: the run's output dir, where ``latest``/``best``/``step-N`` are looked up.
        checksums: verify every file's checksum, or only those of the named files (sizes always).

    Returns:
        ``Resolved(path=None)`` only for ``latest`` when no checkpoint exists yet (a fresh start).

    Raises:
        CheckpointError: naming what was asked and what exists.
    """
    root = checkpoints_dir(output_dir)
    flag = f"--resume_from_checkpoint={spec!r}"
    if spec == "latest":
        found = resolve_latest_valid(root, checksums)
        if found.path is None and list_checkpoints(root):  # checkpoints exist, none is valid: never start over
            raise CheckpointError(f"{flag}: no valid checkpoint under {root}: {found.note}")
        return found
    if spec == "best" or STEP_RE.match(spec):
        folder = read_pointer(root, "best") if spec == "best" else root / spec
        if folder is None or not folder.is_dir():
            raise CheckpointError(f"{flag}: no such checkpoint; {describe_available(root)}")
        return _verified(folder, flag, checksums)
    epoch = EPOCH_RE.match(spec)
    if epoch:
        folder = epoch_end_checkpoint(root, int(epoch.group(1)))
        if folder is None:
            raise CheckpointError(f"{flag}: no checkpoint saved at the end of epoch {epoch.group(1)} (epochs count "
                                  f"from 1; --save_on_each_epoch saves them); {describe_available(root)}")
        return _verified(folder, flag, checksums)
    found = resolve_path(spec, flag, checksums)
    if not (found.path / COMPLETE).is_file():  # a resume needs a whole checkpoint, not weights
        kind = "a file" if found.path.is_file() else "a folder"
        raise CheckpointError(f"{flag}: {found.path} is {kind}, not a checkpoint folder (no {MANIFEST}/{COMPLETE}); "
                              "pass latest, best, step-<N>, a step-N folder or a run's output dir (to load only "
                              "weights, use --init_from)")
    return found


def resolve_path(spec: str | Path, flag: str = "path", checksums: bool | set[str] = True) -> Resolved:
    """Resolve a filesystem path: a step folder, an output dir (its latest), or ``.../latest|best``."""
    path = Path(spec)
    if path.name in POINTERS and not path.is_dir():
        root = path.parent if path.parent.name == CHECKPOINTS else checkpoints_dir(path.parent)
        target = read_pointer(root, path.name)
        if path.name == "latest":
            found = resolve_latest_valid(root, checksums)
            if found.path is None:
                raise CheckpointError(f"{flag}: no valid checkpoint under {root}")
            return found
        if target is None:
            raise CheckpointError(f"{flag}: no '{path.name}' checkpoint; {describe_available(root)}")
        return _verified(target, flag, checksums)
    if not path.exists():
        raise CheckpointError(f"{flag}: {path} does not exist")
    if path.is_dir() and not (path / COMPLETE).exists():
        for root in (checkpoints_dir(path), path):
            if list_checkpoints(root):
                found = resolve_latest_valid(root, checksums)
                if found.path is None:
                    raise CheckpointError(f"{flag}: no valid checkpoint under {root}: {found.note}")
                return found
        if (path / "checkpoints").is_dir() or STEP_RE.match(path.name):
            raise CheckpointError(f"{flag}: {path} holds no complete checkpoint "
                                  f"(a step-N folder counts only once its {COMPLETE} marker exists)")
    if path.is_dir() and (path / COMPLETE).exists():
        return _verified(path, flag, checksums)
    return Resolved(path)  # a single file (legacy .pt, .safetensors) or a plain model folder


def _verified(folder: Path, flag: str, checksums: bool | set[str]) -> Resolved:
    problems = verify(folder, checksums=checksums)
    if problems:
        raise CheckpointError(f"{flag}: {folder} is not a valid checkpoint: " + "; ".join(problems))
    return Resolved(folder)


def remove_stale_temporaries(root: Path, keep: Path | None = None) -> list[Path]:
    """Delete ``.tmp-*`` folders and files left by crashed saves (except ``keep``, a save in progress)."""
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX) and child != keep:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
                removed.append(child)
    return removed


def plan_retention(root: Path, *, keep_last: int | None, keep_every_n_steps: int | None,
                   keep: set[str] = frozenset()) -> list[Path]:
    """The checkpoints retention would delete under ``root`` (see :meth:`CheckpointStorage.plan_retention`)."""
    return [root / n for n in LocalStorage(root).plan_retention(keep_last, keep_every_n_steps, keep)]


def apply_retention(root: Path, *, keep_last: int | None, keep_every_n_steps: int | None,
                    keep: set[str] = frozenset()) -> list[Path]:
    """Delete what :func:`plan_retention` picks."""
    return [root / n for n in LocalStorage(root).apply_retention(keep_last, keep_every_n_steps, keep)]


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot create the checkpoint folder ({err.strerror})") from None
    return path


def checkpoint_folder(path: str | Path, checksums: bool | set[str] = False) -> Path:
    """The complete checkpoint ``path`` names (a ``step-N`` folder, a run's output dir meaning its
    latest, or ``.../latest|best``), for the reading tools.

    Raises:
        CheckpointError: nothing there, or not a complete accel_trainer checkpoint.
    """
    found = resolve_path(path, flag=str(path), checksums=checksums).path
    if not (found / COMPLETE).exists():
        raise CheckpointError(f"{path}: not an accel_trainer checkpoint (no {COMPLETE} marker)")
    return found


@dataclass
class PruneReport:
    doomed: list[Path]
    temporaries: list[Path]
    kept: list[str]


def prune(output_dir: str | Path, *, keep_last: int, keep_every_n_steps: int | None = None,
          dry_run: bool = False) -> PruneReport:
    """Apply the retention rule by hand (``accel-trainer prune``): keep the ``keep_last`` newest,
    ``latest``, ``best`` and every multiple of ``keep_every_n_steps``; delete the rest and what
    crashed saves left. Holds the run's lock, so it refuses while a run writes there.

    Raises:
        CheckpointError: no ``checkpoints/`` folder, ``keep_last`` < 1, or a run holds the lock.
    """
    from .lock import RunLock

    root = checkpoints_dir(output_dir)
    if keep_last < 1:
        raise CheckpointError(f"--keep={keep_last}: must be >= 1 (latest and best are always kept as well)")
    if not root.is_dir():
        raise CheckpointError(f"{output_dir}: no {CHECKPOINTS}/ folder")
    lock = None if dry_run else RunLock.acquire(output_dir)  # not while a run writes there
    try:
        doomed = plan_retention(root, keep_last=keep_last, keep_every_n_steps=keep_every_n_steps)
        temporaries = [p for p in root.iterdir() if p.name.startswith(TMP_PREFIX)]
        kept = [folder.name for _, folder in list_checkpoints(root) if folder not in doomed]
        if not dry_run:
            apply_retention(root, keep_last=keep_last, keep_every_n_steps=keep_every_n_steps)
            remove_stale_temporaries(root)
    finally:
        if lock is not None:
            lock.release()
    return PruneReport(doomed, temporaries, kept)
