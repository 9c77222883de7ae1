"""``accel-trainer upgrade PATH``: rewrite checkpoints of an older format version as the current one.

Format 1 (the first Trainer, before the Checkpointer component) differs from format 2 in four files;
weights, optimizer tensors, model config, run config and Accelerate's RNG files are the same bytes:

    trainer_state.json    counters + data position + best  ->  trainer_state.json (counters),
                                                             dataloader.json (data position),
                                                             the manifest's ``best``
    optimizer.json        one list of groups tagged muon/adamw  ->  groups by optimizer name
    schedulers.json       LambdaLR states                    ->  dropped: the LR is a function of the step
    rng_state_<rank>.pt   our copy of each rank's RNG        ->  dropped: Accelerate's file is the one read

Never in place: the new checkpoint is built and verified next to the old one (``.upgrade-step-N``),
then the old folder is renamed aside (``.upgraded-step-N``), the new one into its name, and the old
one deleted. Neither name starts with ``.tmp-``, so a save's clean-up never removes them; a kill
between the two renames leaves both, and the next ``upgrade`` (or a look at the folder) finishes or
undoes it. The run's lock is held throughout: no run writes the folder meanwhile.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .format import (CHECKPOINTS, COMPLETE, DATALOADER, FORMAT_VERSION, LEGACY_RNG_PREFIX, MANIFEST, OPTIMIZER_GROUPS,
                     SCHEDULERS, STEP_RE, role_of, state_file)
from .checksums import HASH, hash_file
from .io import CheckpointError, fsync_dir, fsync_tree, read_json, write_json
from .manifest import read_manifest, verify, write_complete_marker

BUILDING, OLD = ".upgrade-", ".upgraded-"
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


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:  # the same bytes: a hard link costs nothing, and the old folder is never written
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _build_v2(folder: Path, target: Path, manifest: dict) -> None:
    """Write the format-2 checkpoint of format-1 ``folder`` into ``target`` (complete, marker included)."""
    state_path = folder / state_file(TRAINER_STATE)
    old_state = read_json(state_path) if state_path.is_file() else {}
    run_config = read_json(folder / "run_config.json") if (folder / "run_config.json").is_file() else {}
    world_size = int((manifest.get("environment") or {}).get("world_size") or 1)
    converted = {state_file(TRAINER_STATE), OPTIMIZER_GROUPS, state_file(SCHEDULERS)}
    target.mkdir()
    for name in manifest["files"]:
        if name in converted or Path(name).name.startswith(LEGACY_RNG_PREFIX):
            continue
        _copy(folder / name, target / name)
    if state_path.is_file():
        write_json(target / state_file(TRAINER_STATE), _trainer_state_v2(old_state, run_config))
        write_json(target / state_file(DATALOADER), _dataloader_v2(old_state, run_config, world_size))
    if (folder / OPTIMIZER_GROUPS).is_file():
        groups = folder / OPTIMIZER_GROUPS
        write_json(target / OPTIMIZER_GROUPS, _optimizer_v2(read_json(groups), groups))
    files = {}
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        name = path.relative_to(target).as_posix()
        files[name] = {"size": path.stat().st_size, HASH: hash_file(path), "role": role_of(name)}
    new = {"format_version": FORMAT_VERSION, "step": manifest["step"], "sequence": 0,
           "reasons": manifest.get("reasons", []), "metrics": old_state.get("last_metrics") or {},
           "best": _best_v2(old_state), "created_unix": manifest.get("created_unix"),
           "environment": manifest.get("environment", {}), "files": files,
           "upgraded_from": {"format_version": manifest.get("format_version"), "unix": time.time()}}
    write_json(target / MANIFEST, new)
    write_complete_marker(target, new)
    fsync_tree(target)
    problems = verify(target)
    if problems:
        raise CheckpointError(f"{folder}: the upgraded copy does not verify ({problems[0]}); the original is untouched")


def finish_interrupted(root: Path) -> list[Upgraded]:
    """Complete or undo upgrades a kill interrupted under ``root`` (a ``checkpoints`` folder): an old
    folder renamed aside whose new one is complete is deleted; one whose new one is not, put back."""
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
                continue
        fsync_dir(root)
        shutil.rmtree(aside)
        done.append(Upgraded(final, None, "finished"))
    for building in (p for p in root.iterdir() if p.name.startswith(BUILDING)):
        shutil.rmtree(building)  # never renamed in: its original is still in place
    return done


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
    root = folder.parent
    building, aside = root / f"{BUILDING}{folder.name}", root / f"{OLD}{folder.name}"
    if building.exists():
        shutil.rmtree(building)
    try:
        _build_v2(folder, building, manifest)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    os.rename(folder, aside)
    os.rename(building, folder)
    fsync_dir(root)
    shutil.rmtree(aside)
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
        results = finish_interrupted(root)
        if folders is None:
            folders = [folder for _, folder in list_checkpoints(root)]
            if not folders and not results:
                raise CheckpointError(f"upgrade {path}: holds no checkpoint (give a step-N folder or a run's "
                                      "output dir)")
        return results + [upgrade_checkpoint(folder) for folder in folders]
    finally:
        lock.release()
