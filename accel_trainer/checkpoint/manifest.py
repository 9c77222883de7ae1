"""``manifest.json`` and ``COMPLETE``: what a checkpoint is, and the proof that it is whole.

The manifest names every file with its size, xxh3-128 and role (Accelerate names its files by
position; the manifest says what each holds), and records the step, why it was saved, its metrics,
the best checkpoint so far, and what produced it. ``COMPLETE`` is written after it and holds the
manifest's own checksum and file count, so an edited or truncated manifest (or marker) makes the
checkpoint invalid instead of silently vouching for less than was saved.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
import time
from importlib import metadata
from pathlib import Path

from .format import (COMPLETE, FORMAT_VERSION, MANIFEST, READABLE_VERSIONS, is_optimizer_file, read_in_one_pass,
                     role_of)
from .io import CheckpointError, read_json, write_json
from .checksums import HASH, hash_file

MANIFEST_HASH = f"manifest_{HASH}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(accelerator) -> dict:
    """Versions and the distributed setup that wrote a checkpoint (read from package metadata: no imports)."""
    versions = {name: _version(name) for name in ("accel_trainer", "torch", "accelerate", "transformers")}
    return {**versions, "python": platform.python_version(), "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "mixed_precision": str(accelerator.mixed_precision), "device_type": accelerator.device.type,
            "hostname": platform.node()}


def write_manifest(folder: Path, *, step: int, reasons: list[str], accelerator, metrics: dict | None = None,
                   best: dict | None = None, sequence: int = 0, known: dict | None = None) -> dict:
    """Describe every file under ``folder`` (fsynced already) and write ``manifest.json``.

    Args:
        sequence: the save's number in its run dir (1, 2, ...): which checkpoint is the latest.
        known: file names -> digests computed while writing them (no second read).
    """
    known = known or {}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in (MANIFEST, COMPLETE):
            continue
        files[name] = {"size": path.stat().st_size, HASH: known.get(name) or hash_file(path), "role": role_of(name)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "sequence": sequence, "reasons": reasons,
                "metrics": metrics or {}, "best": best, "created_unix": time.time(),
                "environment": environment(accelerator), "files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


def write_complete_marker(folder: Path, manifest: dict) -> None:
    """The marker: the manifest's checksum and file count, written after the manifest."""
    write_json(folder / COMPLETE, {"step": manifest["step"], "files": len(manifest["files"]),
                                   MANIFEST_HASH: hash_file(folder / MANIFEST)})


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a checkpoint folder.

    Raises:
        CheckpointError: missing, unreadable, not JSON, or of a format version this code cannot read.
    """
    manifest = read_json(Path(folder) / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{Path(folder) / MANIFEST}: not a checkpoint manifest (no 'files' table)")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{Path(folder) / MANIFEST}: format_version={version!r}, this accel_trainer reads "
                              f"{list(READABLE_VERSIONS)}; use the accel_trainer version that wrote it")
    return manifest


def saved_digests(folder: str | Path) -> dict[str, str]:
    """File name -> the checksum its manifest recorded ({} when the manifest cannot be read: the
    caller then reads without comparing, as for a folder that is not a checkpoint)."""
    try:
        files = read_manifest(folder)["files"]
    except CheckpointError:
        return {}
    return {name: info[HASH] for name, info in files.items() if isinstance(info, dict) and info.get(HASH)}


def _marker_problem(folder: Path, manifest: dict) -> str | None:
    try:
        marker = read_json(folder / COMPLETE)
    except CheckpointError as err:
        return str(err)
    if not isinstance(marker, dict):
        return f"{folder / COMPLETE}: not a completion marker"
    if marker.get("files") != len(manifest["files"]):
        return (f"{folder / MANIFEST}: lists {len(manifest['files'])} files but {COMPLETE} says {marker.get('files')} "
                "(the manifest was changed after the save)")
    expected = marker.get(MANIFEST_HASH)
    if expected is None and manifest.get("format_version", 1) >= 2:
        return f"{folder / COMPLETE}: has no manifest checksum (damaged marker)"
    if expected is not None and hash_file(folder / MANIFEST) != expected:
        return f"{folder / MANIFEST}: checksum differs from the one in {COMPLETE} (the manifest changed after the save)"
    return None


@dataclass(frozen=True)
class Checksums:
    """A ``checksums`` argument of :func:`verify` that leaves some files' checksums to others.

    Attributes:
        except_optimizer: the optimizer's files are not looked at (a resume with
            ``--reset_optimizer`` reads none, so a damaged one does not make the checkpoint unusable).
        loaded_in_one_pass: the tensor files the loader hashes as it reads them
            (:func:`~.format.read_in_one_pass`) get their size checked only: a resume reads each once
            and still refuses a damaged one before training starts.
    """

    except_optimizer: bool = False
    loaded_in_one_pass: bool = False

    def __bool__(self) -> bool:
        return True

    def hashes(self, name: str) -> bool:
        return not (self.loaded_in_one_pass and read_in_one_pass(name))


EXCEPT_OPTIMIZER = Checksums(except_optimizer=True)
WHILE_LOADING = Checksums(loaded_in_one_pass=True)


def for_resume(reset_optimizer: bool) -> Checksums:
    """What a resume's resolution verifies before loading (the loader verifies the rest as it reads)."""
    return Checksums(except_optimizer=reset_optimizer, loaded_in_one_pass=True)


def verify(folder: str | Path, checksums: bool | set[str] | Checksums = True) -> list[str]:
    """Problems that make ``folder`` unusable, each naming the file; empty when the checkpoint is valid.

    Never raises for a damaged checkpoint: every failure to read or decode its metadata is a problem.

    Args:
        folder: a ``step-N`` checkpoint folder.
        checksums: also compare every file's xxh3-128 (reads every byte), not only its size; a set of
            file names checks only those (a reader verifies what it reads, e.g. not the optimizer);
            a :class:`Checksums` hashes every file but those it leaves to others.
    """
    folder = Path(folder)
    try:
        if not folder.is_dir():
            return [f"{folder}: not a folder"]
        if not (folder / COMPLETE).is_file():
            return [f"{folder}: no {COMPLETE} marker (the save did not finish)"]
        manifest = read_manifest(folder)
        problem = _marker_problem(folder, manifest)
        if problem:
            return [problem]
        problems = []
        policy = checksums if isinstance(checksums, Checksums) else None
        skip_optimizer = policy is not None and policy.except_optimizer
        for name, info in manifest["files"].items():
            path = folder / name
            if skip_optimizer and is_optimizer_file(name):
                continue
            if not path.is_file():
                problems.append(f"{path}: missing ({info.get('role', '')})")
            elif path.stat().st_size != info.get("size"):
                problems.append(f"{path}: size {path.stat().st_size} bytes, manifest says {info.get('size')}")
            elif ((checksums is True or (policy is not None and policy.hashes(name))
                   or (policy is None and checksums and name in checksums))
                  and hash_file(path) != info.get(HASH)):
                problems.append(f"{path}: checksum mismatch (the file changed after it was saved)")
        return problems
    except CheckpointError as err:
        return [str(err)]
    except (OSError, ValueError, TypeError, AttributeError) as err:  # damaged metadata of any shape
        return [f"{folder}: unreadable checkpoint metadata ({type(err).__name__}: {err})"]
