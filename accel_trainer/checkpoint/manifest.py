"""``manifest.json``: what a checkpoint is, what produced it, and every file with size, xxh3-128 and role.

Accelerate names its files by position (``optimizer.bin``, ``random_states_0.pkl``); the manifest
names what each one holds, so a checkpoint describes itself and a damaged file is found by name.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

from .io import CheckpointError, read_json, write_json
from .tensor_files import HASH, hash_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"

ROLES = {
    "model.safetensors": "model weights (safetensors, names as in model.state_dict())",
    "optimizer.safetensors": "every optimizer state tensor, keyed '<parameter name>::<state key>'",
    "optimizer.json": "optimizer param groups: each tagged with its optimizer (muon/adamw), param_names, hyperparameters",
    "scaler.pt": "fp16 grad scaler state",
    "trainer_state.json": "trainer counters: step, epoch, data position, tokens, best val loss, EMA loss, last metrics",
    "schedulers.json": "LR schedulers by optimizer name",
    "config.json": "model config (rebuilds the model without the recipe)",
    "run_config.json": "full run configuration (all flags)",
}


def role_of(name: str) -> str:
    if name in ROLES:
        return ROLES[name]
    if name.startswith("rng_state_"):
        return "RNG of one rank (python, numpy, torch, cuda), read by accel_trainer"
    if name.startswith("random_states_"):
        return "RNG of one rank as Accelerate writes it (superseded by rng_state_<rank>.pt)"
    if name.startswith("pytorch_model_fsdp"):
        return "model shard (FSDP sharded state dict, torch.distributed.checkpoint)"
    if name.startswith("optimizer_"):
        return "optimizer shard (FSDP sharded state dict, torch.distributed.checkpoint)"
    return "written by Accelerate's save_state"


def environment(accelerator) -> dict:
    import accelerate
    import torch
    import transformers

    from .. import __version__

    return {
        "accel_trainer": __version__, "torch": torch.__version__, "accelerate": accelerate.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": str(accelerator.mixed_precision), "device_type": accelerator.device.type,
        "hostname": platform.node(),
    }


def write_manifest(folder: Path, *, step: int, reasons: list[str], accelerator, known: dict | None = None) -> dict:
    """Describe every file under ``folder`` (fsynced already) and write ``manifest.json``.

    ``known`` maps file names to digests computed while writing them (no second read).
    """
    known = known or {}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in (MANIFEST, COMPLETE):
            continue
        files[name] = {"size": path.stat().st_size, HASH: known.get(name) or hash_file(path), "role": role_of(name)}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "reasons": reasons,
                "created_unix": time.time(), "environment": environment(accelerator), "files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    manifest = read_json(Path(folder) / MANIFEST)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{folder}/{MANIFEST}: format_version={version!r}, this accel_trainer reads "
                              f"{FORMAT_VERSION}; use the accel_trainer version that wrote it")
    return manifest


def verify(folder: str | Path, checksums: bool | set[str] = True) -> list[str]:
    """Problems that make ``folder`` unusable, each naming the file; empty when the checkpoint is valid.

    Args:
        folder: a ``step-N`` checkpoint folder.
        checksums: also compare every file's xxh3-128 (reads every byte), not only its size; a set of
            file names checks only those (a reader verifies what it reads, e.g. not the optimizer).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    if not (folder / COMPLETE).exists():
        return [f"{folder}: no {COMPLETE} marker (the save did not finish)"]
    try:
        manifest = read_manifest(folder)
    except CheckpointError as err:
        return [str(err)]
    problems = []
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing ({info.get('role', '')})")
        elif path.stat().st_size != info["size"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, manifest says {info['size']}")
        elif (checksums is True or (checksums and name in checksums)) and hash_file(path) != info.get(HASH):
            problems.append(f"{path}: checksum mismatch (the file changed after it was saved)")
    return problems


def write_complete_marker(folder: Path, manifest: dict) -> None:
    write_json(folder / COMPLETE, {"step": manifest["step"], "files": len(manifest["files"])})
