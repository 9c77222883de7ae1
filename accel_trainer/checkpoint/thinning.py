"""Weights-only history (``--full_state_total_limit N``): the whole state (optimizers, data position,
RNG, grad scaler) only in the newest N checkpoints and ``best``; older kept checkpoints keep their
weights, config, tokenizer and counters, and become ``weights_only`` in their manifest.

An optimizer's state is two to three times the size of the weights (AdamW's two moments, Muon's
momentum), and only the newest checkpoint is ever resumed in practice: older ones are kept to
evaluate, export or compare weights, which is all a thinned one still does. Each thinned checkpoint
is a complete checkpoint that verifies on its own (its manifest lists what it holds); it is rewritten
through :mod:`.rewrite`, so a kill at any instant leaves either the full or the thinned one. ``latest``
is never thinned, nor a checkpoint still uploading. A sharded (DCP) checkpoint's files hold model
and optimizer together: thinning it writes the model's tensors as one ``model.safetensors`` (read
from the shards a group at a time) and drops ``sharded/``; it then loads on any world size as a
one-process checkpoint does (each rank takes its slice).
"""

from __future__ import annotations

import time
from pathlib import Path

from .checksums import HASH
from .format import (DATALOADER, LEGACY_RNG_PREFIX, MANIFEST, MODEL_WEIGHTS, RNG_PREFIX, SCALER, SCHEDULERS,
                     SHARDED_DIR, WEIGHTS_ONLY, is_optimizer_file, role_of, state_file)
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
    (by save order), the ``latest``/``best`` targets, those in ``keep`` (still uploading) and those
    already thinned."""
    if not full_state_limit:
        return []
    storage = LocalStorage(root)
    newest_first = [name for _, _, name in storage.complete_steps()]
    protected = {t for t in (storage.read_pointer(p) for p in ("latest", "best")) if t} | set(keep)
    doomed = []
    for name in newest_first[full_state_limit:]:
        if name in protected:
            continue
        try:
            manifest = read_json(root / name / MANIFEST)
        except CheckpointError:  # unreadable: verification and retention deal with it
            continue
        files = manifest.get("files", {})
        if not is_weights_only(manifest) and any(is_full_state_file(f) or _in_shards(f) for f in files):
            doomed.append(name)
    return sorted(doomed, key=step_number)


def _in_shards(name: str) -> bool:
    return name.startswith(f"{SHARDED_DIR}/")


def thin_checkpoint(folder: Path) -> int:
    """Rewrite ``folder`` without its full-state files (atomically); returns the bytes freed."""
    manifest = read_json(folder / MANIFEST)
    dropped = {n: info for n, info in manifest["files"].items() if is_full_state_file(n) or _in_shards(n)}
    added = {}

    def build(target: Path) -> None:
        for name in manifest["files"]:
            if name not in dropped:
                link_or_copy(folder / name, target / name)
        if any(_in_shards(n) for n in dropped):  # the model's shards, stitched into one plain file
            from .weights import write_consolidated  # torch: `list`/`inspect` read this module without it

            digest = write_consolidated(folder / SHARDED_DIR, target / MODEL_WEIGHTS)
            added[MODEL_WEIGHTS] = {"size": (target / MODEL_WEIGHTS).stat().st_size, HASH: digest,
                                    "role": role_of(MODEL_WEIGHTS)}
        kept = {n: i for n, i in manifest["files"].items() if n not in dropped}
        new = {**manifest, "files": {**kept, **added},
               WEIGHTS_ONLY: {"dropped": sorted(dropped), "unix": time.time()}}
        write_json(target / MANIFEST, new)
        write_complete_marker(target, new)

    # Sizes only: every data file kept is linked (copied only where a file system has no links), so a
    # second read of the weights on each save would buy nothing; the new manifest is covered by the
    # marker's checksum.
    rewrite_checkpoint(folder, build, checksums=False)
    return sum(info.get("size", 0) for info in dropped.values()) - sum(info["size"] for info in added.values())


def apply_thinning(root: Path, full_state_limit: int | None, keep: set[str] = frozenset()) -> list[Path]:
    """Thin what :func:`plan_thinning` picks; returns the folders thinned."""
    thinned = []
    for name in plan_thinning(root, full_state_limit, keep):
        thin_checkpoint(root / name)
        thinned.append(root / name)
    return thinned
