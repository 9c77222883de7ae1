"""Rewrite a committed ``step-N`` folder as a new complete checkpoint, never in place, safe under
kill -9 at any instant (format upgrades, weights-only thinning).

The new checkpoint is built and verified next to the old one (``.rewrite-step-N``, hard links for
files it keeps), then the old folder is renamed aside (``.rewritten-step-N``), the new one into its
name, and the old one deleted. Neither name starts with ``.tmp-``, so a save's clean-up never removes
them. A kill between the two renames leaves ``step-N`` missing for an instant (readers fall back to
the next older checkpoint) and both folders present: :func:`finish_interrupted`, run before each save
and by ``accel-trainer upgrade``, puts the complete one in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from .io import CheckpointError, fsync_dir, fsync_tree
from .manifest import verify

BUILDING, OLD = ".rewrite-", ".rewritten-"


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` with the bytes of ``src``: a hard link (free; the old folder is never written), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def rewrite_checkpoint(folder: Path, build: Callable[[Path], None], checksums: bool = True) -> None:
    """Replace checkpoint ``folder`` by what ``build(target)`` writes into an empty ``target``
    (manifest and COMPLETE marker included); ``target`` must verify before it replaces anything
    (``checksums`` False: sizes only, for a rewrite that links every data file it keeps and writes
    only the manifest and marker, which the marker's own checksum covers).

    Raises:
        CheckpointError: the new checkpoint does not verify (the old one stays, untouched); and
            whatever ``build`` raises, after removing its partial folder.
    """
    root = folder.parent
    building, aside = root / f"{BUILDING}{folder.name}", root / f"{OLD}{folder.name}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        build(building)
        fsync_tree(building)
        problems = verify(building, checksums=checksums)
        if problems:
            raise CheckpointError(f"{folder}: the rewritten copy does not verify ({problems[0]}); the original is "
                                  "untouched")
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    os.rename(folder, aside)
    os.rename(building, folder)
    fsync_dir(root)
    shutil.rmtree(aside)


def finish_interrupted(root: Path) -> list[Path]:
    """Complete or undo rewrites a kill interrupted under ``root`` (a ``checkpoints`` folder): a
    folder renamed aside whose new one is complete is deleted once the new one is in place; otherwise
    it is put back. Returns the checkpoints whose rewrite was completed."""
    done = []
    if not root.is_dir():
        return done
    for aside in sorted(p for p in root.iterdir() if p.name.startswith(OLD)):
        name = aside.name[len(OLD):]
        final, building = root / name, root / f"{BUILDING}{name}"
        if not final.exists():
            if building.is_dir() and not verify(building):
                os.rename(building, final)
            else:
                os.rename(aside, final)
                fsync_dir(root)
                continue
        fsync_dir(root)
        shutil.rmtree(aside)
        done.append(final)
    for building in [p for p in root.iterdir() if p.name.startswith(BUILDING)]:
        shutil.rmtree(building)  # never renamed in: its original is still in place
    return done
