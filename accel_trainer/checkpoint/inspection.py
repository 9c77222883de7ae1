"""Read-only views of checkpoints for the ``accel-trainer`` commands: list, inspect, diff.

Everything here reads JSON and safetensors headers (and, for ``diff``, tensors one at a time);
nothing is unpickled except through the safe loader.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path


from .io import CheckpointError, read_json
from .layout import checkpoints_dir, read_pointer, step_folders
from .manifest import COMPLETE, read_manifest


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes), without reading tensors."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def list_run(output_dir: str | Path) -> list[dict]:
    """One row per ``step-N`` folder (complete or not) under a run's output dir, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        raise CheckpointError(f"{output_dir}: no checkpoints/ folder (is this a run's output dir?)")
    pointers = {name: read_pointer(root, name) for name in ("latest", "best")}
    rows = []
    for step, child in step_folders(root):
        complete = (child / COMPLETE).exists()
        state = read_json(child / "trainer_state.json") if (child / "trainer_state.json").exists() else {}
        metrics = state.get("last_metrics") or {}
        rows.append({
            "name": child.name, "step": step, "complete": complete,
            "epoch": state.get("epoch"), "tokens_seen": state.get("tokens_seen"),
            "val_loss": metrics.get("val_loss"), "best_val_loss": state.get("best_val_loss"),
            "size_bytes": folder_size(child),
            "tags": [n for n, p in pointers.items() if p is not None and p.name == child.name],
        })
    return rows


def _optimizer_summary(folder: Path) -> list[dict]:
    groups_file, tensors_file = folder / "optimizer.json", folder / "optimizer.safetensors"
    if not groups_file.exists():
        return []
    description = read_json(groups_file)
    header = safetensors_header(tensors_file) if tensors_file.exists() else {}
    sizes: dict[str, int] = {}
    for key, info in header.items():
        name = key.rpartition("::")[0]
        sizes[name] = sizes.get(name, 0) + info["data_offsets"][1] - info["data_offsets"][0]
    summary = []
    for group in description["param_groups"]:
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names", "optimizer")}
        summary.append({"optimizer": group.get("optimizer"), "parameters": len(group["param_names"]),
                        "state_bytes": sum(sizes.get(n, 0) for n in group["param_names"]), "hyperparameters": hyper})
    return summary


def inspect(folder: str | Path) -> dict:
    """Everything a checkpoint says about itself, as one JSON-able dict."""
    from ..models import MoEConfig, parameter_counts

    folder = Path(folder)
    manifest = read_manifest(folder)
    state = read_json(folder / "trainer_state.json")
    config = read_json(folder / "config.json")
    counts = parameter_counts(MoEConfig.from_dict(config))
    schedulers = read_json(folder / "schedulers.json") if (folder / "schedulers.json").exists() else {}
    return {
        "path": str(folder), "format_version": manifest["format_version"], "step": state["global_step"],
        "epoch": state["epoch"], "samples_in_epoch": state["samples_in_epoch"], "tokens_seen": state["tokens_seen"],
        "best_val_loss": state["best_val_loss"], "best_val_step": state["best_val_step"],
        "ema_loss": state["ema_loss"], "metrics": state.get("last_metrics", {}), "saved_because": manifest["reasons"],
        "environment": manifest["environment"], "parameters": counts,
        "files": {n: {"size": i["size"], "role": i["role"]} for n, i in manifest["files"].items()},
        "total_bytes": sum(i["size"] for i in manifest["files"].values()),
        "optimizers": _optimizer_summary(folder),
        "schedulers": {n: {"last_epoch": s.get("last_epoch"), "base_lrs": s.get("base_lrs"),
                           "last_lr": s.get("_last_lr")} for n, s in schedulers.items()},
        "grad_scaler": "scaler.pt" in manifest["files"],
        "model_config": config, "run_config": read_json(folder / "run_config.json"),
    }


def _dict_diff(a: dict, b: dict, ignore: set[str] = frozenset()) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def diff(a: str | Path, b: str | Path) -> dict:
    """Config differences, architecture differences (keys/shapes) and per-tensor change norms."""
    from safetensors import safe_open

    a, b = Path(a), Path(b)
    meta_keys = {"transformers_version", "architectures", "dtype", "torch_dtype"}
    ha, hb = safetensors_header(a / "model.safetensors"), safetensors_header(b / "model.safetensors")
    only_a, only_b = sorted(set(ha) - set(hb)), sorted(set(hb) - set(ha))
    shapes = [f"{k}: {ha[k]['shape']} -> {hb[k]['shape']}" for k in sorted(set(ha) & set(hb))
              if ha[k]["shape"] != hb[k]["shape"]]
    changes = []
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        for key in sorted(set(ha) & set(hb)):
            if ha[key]["shape"] != hb[key]["shape"]:
                continue
            ta, tb = fa.get_tensor(key).float(), fb.get_tensor(key).float()
            delta = (tb - ta).norm().item()
            base = ta.norm().item()
            changes.append({"tensor": key, "change_norm": delta, "relative": delta / base if base else math.inf})
    return {
        "run_config": _dict_diff(read_json(a / "run_config.json"), read_json(b / "run_config.json")),
        "model_config": _dict_diff(read_json(a / "config.json"), read_json(b / "config.json"), meta_keys),
        "only_in_a": only_a, "only_in_b": only_b, "shape_changes": shapes,
        "tensor_changes": sorted(changes, key=lambda c: -c["relative"]),
    }
