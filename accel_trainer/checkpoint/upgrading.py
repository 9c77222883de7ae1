"""``accel-trainer upgrade PATH``: rewrite checkpoints of an older format version as the current one.

Format 1 (the first Trainer, before the Checkpointer component) differs from format 2 in four files;
weights, optimizer tensors, model config, run config and Accelerate's RNG files are the same bytes:

    trainer_state.json    counters + data position + best  ->  trainer_state.json (counters),
                                                             dataloader.json (data position),
                                                             the manifest's ``best``
    optimizer.json        one list of groups tagged muon/adamw  ->  groups by optimizer name
    schedulers.json       LambdaLR states                    ->  dropped: the LR is a function of the step
    rng_state_<rank>.pt   our copy of each rank's RNG        ->  dropped: Accelerate's file is the one read

Never in place (see :mod:`.rewrite`): built and verified next to the old one, then swapped in by
two renames; a kill between them is finished by the next ``upgrade`` or save. The run's lock is
held throughout: no run writes the folder meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .format import (CHECKPOINTS, COMPLETE, DATALOADER, FORMAT_VERSION, LEGACY_RNG_PREFIX, MANIFEST, OPTIMIZER_GROUPS,
                     SCHEDULERS, STEP_RE, role_of, state_file)
from .checksums import HASH, hash_file
from .io import CheckpointError, read_json, write_json
from .manifest import read_manifest, verify, write_complete_marker
from .rewrite import finish_interrupted, link_or_copy, rewrite_checkpoint

TRAINER_STATE = "trainer_state"
OPTIMIZER_FORMAT_1, OPTIMIZER_FORMAT_2 = "accel_trainer.optimizer/1", "accel_trainer.optimizer/2"
# Format 1's trainer_state keys that format 2 keeps there; the others moved (or were never needed).
_COUNTERS = ("global_step", "tokens_seen", "ema_loss", "trackers")


@dataclass
class Upgraded:
    """What :func:`upgrade` did to one checkpoint folder."""

    folder: Path
    from_version: int | None
    action: str  # "upgraded", "current" (nothing to do), "finished" (an interrupted upgrade completed)


def _trainer_state_v2(old: dict, run_config: dict) -> dict:
    steps = run_config.get("max_steps")
    return {**{k: old[k] for k in _COUNTERS if k in old}, "nonfinite_steps": 0,
            "schedule_steps": steps if isinstance(steps, int) and steps > 0 else None}


def _dataloader_v2(old: dict, run_config: dict, world_size: int) -> dict:
    per_device = int(run_config.get("per_device_train_batch_size") or 1)
    return {"epoch": int(old.get("epoch", 0)), "samples_in_epoch": int(old.get("samples_in_epoch", 0)),
            "global_batch_size": per_device * world_size, "epoch_generator_state": None}


def _optimizer_v2(old: dict, where: Path) -> dict:
    if old.get("format") != OPTIMIZER_FORMAT_1:
        raise CheckpointError(f"{where}: format {old.get('format')!r}, expected {OPTIMIZER_FORMAT_1!r} in a format-1 "
                              "checkpoint")
    optimizers: dict[str, dict] = {}
    for i, group in enumerate(old["param_groups"]):
        name = group.get("optimizer")
        if not name:
            raise CheckpointError(f"{where}: param group {i} names no optimizer ('optimizer' key missing)")
        entry = optimizers.setdefault(name, {"param_groups": [], "scalars": {}})
        entry["param_groups"].append({k: v for k, v in group.items() if k != "optimizer"})
        for pname in group.get("param_names", []):
            if pname in old.get("scalars", {}):
                entry["scalars"][pname] = old["scalars"][pname]
    return {"format": OPTIMIZER_FORMAT_2, "optimizers": optimizers}


def _best_v2(old_state: dict) -> dict | None:
    if old_state.get("best_val_step") is None or old_state.get("best_val_loss") is None:
        return None
    return {"metric": "val_loss", "step": old_state["best_val_step"], "value": old_state["best_val_loss"]}


def _build_v2(folder: Path, target: Path, manifest: dict) -> None:
    """Write the format-2 checkpoint of format-1 ``folder`` into ``target`` (complete, marker included)."""
    state_path = folder / state_file(TRAINER_STATE)
    old_state = read_json(state_path) if state_path.is_file() else {}
    run_config = read_json(folder / "run_config.json") if (folder / "run_config.json").is_file() else {}
    world_size = int((manifest.get("environment") or {}).get("world_size") or 1)
    converted = {state_file(TRAINER_STATE), OPTIMIZER_GROUPS, state_file(SCHEDULERS)}
    for name in manifest["files"]:
        if name in converted or Path(name).name.startswith(LEGACY_RNG_PREFIX):
            continue
        link_or_copy(folder / name, target / name)
    if state_path.is_file():
        write_json(target / state_file(TRAINER_STATE), _trainer_state_v2(old_state, run_config))
        write_json(target / state_file(DATALOADER), _dataloader_v2(old_state, run_config, world_size))
    if (folder / OPTIMIZER_GROUPS).is_file():
        groups = folder / OPTIMIZER_GROUPS
        write_json(target / OPTIMIZER_GROUPS, _optimizer_v2(read_json(groups), groups))
    files = {}
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        name = path.relative_to(target).as_posix()
        kept = manifest["files"].get(name) if name not in converted else None  # linked: its entry holds
        files[name] = {"size": path.stat().st_size, HASH: kept[HASH] if kept else hash_file(path),
                       "role": role_of(name)}
    new = {"format_version": FORMAT_VERSION, "step": manifest["step"], "sequence": 0,
           "reasons": manifest.get("reasons", []), "metrics": old_state.get("last_metrics") or {},
           "best": _best_v2(old_state), "created_unix": manifest.get("created_unix"),
           "environment": manifest.get("environment", {}), "files": files,
           "upgraded_from": {"format_version": manifest.get("format_version"), "unix": time.time()}}
    write_json(target / MANIFEST, new)
    write_complete_marker(target, new)


def upgrade_checkpoint(folder: str | Path) -> Upgraded:
    """Rewrite one ``step-N`` folder in the current format (atomically, see the module).

    Raises:
        CheckpointError: the folder does not verify (nothing is changed), or is of a version this code
            cannot upgrade.
    """
    folder = Path(folder)
    problems = verify(folder)
    if problems:
        raise CheckpointError(f"{folder}: does not verify, not upgraded ({problems[0]}); "
                              "run accel-trainer verify on it")
    manifest = read_manifest(folder)
    version = manifest.get("format_version")
    if version == FORMAT_VERSION:
        return Upgraded(folder, version, "current")
    if version != 1:
        raise CheckpointError(f"{folder}: format_version={version!r}, this accel_trainer upgrades format 1 to "
                              f"{FORMAT_VERSION}")
    rewrite_checkpoint(folder, lambda target: _build_v2(folder, target, manifest))
    return Upgraded(folder, version, "upgraded")


def upgrade(path: str | Path) -> list[Upgraded]:
    """Upgrade a checkpoint folder, or every checkpoint of a run (its output dir or ``checkpoints``
    folder), holding the run's lock.

    Raises:
        CheckpointError: not a checkpoint or run folder, the run in use, or a checkpoint that does not
            verify (those before it are upgraded; it and those after it are untouched).
    """
    from .layout import list_checkpoints
    from .lock import RunLock

    path = Path(path)
    if STEP_RE.match(path.name) and (path / COMPLETE).exists():
        root, folders = path.parent, [path]
    else:
        root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
        if not root.is_dir():
            raise CheckpointError(f"upgrade {path}: no such folder (give a step-N folder or a run's output dir)")
        folders = None
    run_dir = root.parent if root.name == CHECKPOINTS else root
    lock = RunLock.acquire(run_dir)
    try:
        results = [Upgraded(p, None, "finished") for p in finish_interrupted(root)]
        if folders is None:
            folders = [folder for _, folder in list_checkpoints(root)]
            if not folders and not results:
                raise CheckpointError(f"upgrade {path}: holds no checkpoint (give a step-N folder or a run's "
                                      "output dir)")
        return results + [upgrade_checkpoint(folder) for folder in folders]
    finally:
        lock.release()
