"""Weights-only history (``--full_state_total_limit N``): the whole state (optimizers, data position,
RNG, grad scaler) only in the newest N checkpoints and ``best``; older kept checkpoints keep their
weights, config, tokenizer and counters, and become ``weights_only`` in their manifest.

An optimizer's state is two to three times the size of the weights (AdamW's two moments, Muon's
momentum), and only the newest checkpoint is ever resumed in practice: older ones are kept to
evaluate, export or compare weights, which is all a thinned one still does. Each thinned checkpoint
is a complete checkpoint that verifies on its own (its manifest lists what it holds); it is rewritten
through :mod:`.rewrite`, so a kill at any instant leaves either the full or the thinned one. ``latest``
is never thinned, nor a checkpoint still uploading; a sharded (DCP) checkpoint keeps everything (its
files hold model and optimizer together).
"""

from __future__ import annotations

import time
from pathlib import Path

from .format import (DATALOADER, LEGACY_RNG_PREFIX, MANIFEST, RNG_PREFIX, SCALER, SCHEDULERS, SHARDED_DIR,
                     WEIGHTS_ONLY, is_optimizer_file, state_file)
from .io import CheckpointError, read_json, write_json
from .manifest import write_complete_marker
from .rewrite import link_or_copy, rewrite_checkpoint
from .storage import LocalStorage, step_number


def is_full_state_file(name: str) -> bool:
    """A file a weights-only checkpoint drops: what only a resume reads."""
    return (is_optimizer_file(name) or name in (state_file(DATALOADER), state_file(SCHEDULERS), SCALER)
            or name.startswith((RNG_PREFIX, LEGACY_RNG_PREFIX)))


def is_weights_only(manifest: dict | None) -> bool:
    return bool((manifest or {}).get(WEIGHTS_ONLY))


def plan_thinning(root: Path, full_state_limit: int | None, keep: set[str] = frozenset()) -> list[str]:
    """The checkpoints under ``root`` to make weights-only: all but the newest ``full_state_limit``
    (by save order), the ``latest``/``best`` targets, those in ``keep`` (still uploading), sharded
    ones and those already thinned."""
    if not full_state_limit:
        return []
    storage = LocalStorage(root)
    newest_first = [name for _, _, name in storage.complete_steps()]
    protected = {t for t in (storage.read_pointer(p) for p in ("latest", "best")) if t} | set(keep)
    doomed = []
    for name in newest_first[full_state_limit:]:
        if name in protected or (root / name / SHARDED_DIR).is_dir():
            continue
        try:
            manifest = read_json(root / name / MANIFEST)
        except CheckpointError:  # unreadable: verification and retention deal with it
            continue
        if not is_weights_only(manifest) and any(is_full_state_file(f) for f in manifest.get("files", {})):
            doomed.append(name)
    return sorted(doomed, key=step_number)


def thin_checkpoint(folder: Path) -> int:
    """Rewrite ``folder`` without its full-state files (atomically); returns the bytes freed."""
    manifest = read_json(folder / MANIFEST)
    dropped = {n: info for n, info in manifest["files"].items() if is_full_state_file(n)}

    def build(target: Path) -> None:
        for name in manifest["files"]:
            if name not in dropped:
                link_or_copy(folder / name, target / name)
        new = {**manifest, "files": {n: i for n, i in manifest["files"].items() if n not in dropped},
               WEIGHTS_ONLY: {"dropped": sorted(dropped), "unix": time.time()}}
        write_json(target / MANIFEST, new)
        write_complete_marker(target, new)

    # Sizes only: every data file kept is linked (copied only where a file system has no links), so a
    # second read of the weights on each save would buy nothing; the new manifest is covered by the
    # marker's checksum.
    rewrite_checkpoint(folder, build, checksums=False)
    return sum(info.get("size", 0) for info in dropped.values())


def apply_thinning(root: Path, full_state_limit: int | None, keep: set[str] = frozenset()) -> list[Path]:
    """Thin what :func:`plan_thinning` picks; returns the folders thinned."""
    thinned = []
    for name in plan_thinning(root, full_state_limit, keep):
        thin_checkpoint(root / name)
        thinned.append(root / name)
    return thinned
