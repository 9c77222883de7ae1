"""Read-only views of checkpoints for the ``accel-trainer`` commands: list, inspect, diff.

Everything here reads JSON and safetensors headers (and, for ``diff``, tensors one at a time);
nothing is unpickled except through the safe loader.
"""

from __future__ import annotations

import math
from pathlib import Path


from .format import (CHECKPOINTS, COMPLETE, STEP_RE, DATALOADER, MODEL_CONFIG, MODEL_WEIGHTS,
                     OPTIMIZER_GROUPS, OPTIMIZER_TENSORS, RUN_CONFIG, SCALER, SCHEDULERS, STATE_SUFFIXES, WEIGHTS_ONLY,
                     state_file, tensor_file, weight_files)
from .stored_tensors import tensor_header
from .io import CheckpointError, read_json, read_state
from .layout import checkpoints_dir
from .manifest import read_manifest
from .storage import LocalStorage, step_number

KNOWN_JSON = {MODEL_CONFIG, RUN_CONFIG, OPTIMIZER_GROUPS, state_file(SCHEDULERS), state_file(DATALOADER)}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _optional_state(folder: Path, name: str):
    try:
        return read_state(folder, name)
    except CheckpointError:
        return None


def list_run(location: str | Path, storage_options: dict | None = None) -> list[dict]:
    """One row per ``step-N`` (complete or not) of a run's output dir or ``s3://...`` URL, oldest first.

    A checkpoint whose metadata cannot be read gets a row with its ``problem`` instead of failing the list.
    """
    from .remote import is_url, storage_for

    if not is_url(location) and not checkpoints_dir(location).is_dir():
        raise CheckpointError(f"{location}: no checkpoints/ folder (is this a run's output dir?)")
    return storage_for(location, storage_options).rows()


def verify_run(location: str | Path, storage_options: dict | None = None) -> list[tuple[str, list[str]]]:
    """``(where, problems)`` of every checkpoint ``location`` names: a ``step-N`` folder or URL, or a
    run's output dir or URL (all its checkpoints). Every file's checksum is compared.

    Raises:
        CheckpointError: ``location`` does not exist or holds no ``step-N`` checkpoint.
    """
    from .remote import is_url, storage_for

    text = str(location).rstrip("/")
    name = text.rsplit("/", 1)[-1]
    only = name if STEP_RE.match(name) else None
    if is_url(text):
        base = text.rsplit("/", 1)[0] if only else text
        base = base[: -len(f"/{CHECKPOINTS}")] if base.endswith(f"/{CHECKPOINTS}") else base
        storage = storage_for(base, storage_options)
    else:
        path = Path(location)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist")
        if (path / COMPLETE).exists() or only:
            storage, only = LocalStorage(path.parent), path.name
        else:
            storage = LocalStorage(checkpoints_dir(path) if checkpoints_dir(path).is_dir() else path)
    names = [only] if only else sorted(storage.listing(), key=step_number)
    if not names:
        raise CheckpointError(f"no step-N checkpoints under {storage.display()}")
    listing = storage.listing()
    return [(storage.display(n), storage.problems(n, listing.get(n, {}), checksums=True)[0]) for n in names]


def _optimizer_summary(folder: Path) -> list[dict]:
    if not (folder / OPTIMIZER_GROUPS).exists():
        return []
    description = read_json(folder / OPTIMIZER_GROUPS)
    stored = tensor_file(folder, OPTIMIZER_TENSORS)
    header = tensor_header(stored) if stored is not None else {}
    sizes: dict[str, int] = {}
    for key, info in header.items():
        name = key.rpartition("::")[0]
        sizes[name] = sizes.get(name, 0) + info["nbytes"]
    summary = []
    for opt_name, saved in description.get("optimizers", {}).items():
        names = [n for group in saved["param_groups"] for n in group["param_names"]]
        hyper = {k: v for k, v in saved["param_groups"][0].items() if k not in ("params", "param_names", "optimizer")}
        summary.append({"optimizer": opt_name, "parameters": len(names), "groups": len(saved["param_groups"]),
                        "state_bytes": sum(sizes.get(n, 0) for n in names), "hyperparameters": hyper})
    return summary


def _model_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Model tensor names and shapes from the safetensors header or, for a sharded (FSDP)
    checkpoint, from its torch.distributed.checkpoint metadata; no tensor is read."""
    stored = weight_files(folder)
    if stored:
        return {k: info["shape"] for f in stored for k, info in tensor_header(f).items()}
    from .weights import sharded_model_shapes  # imports torch: only for sharded checkpoints

    return sharded_model_shapes(folder)


def _tensor_count(folder: Path, config: dict | None) -> dict | None:
    """Parameter counts from the weights' metadata: total, and for a mixture of experts
    (``num_experts``/``num_experts_per_tok`` in its config) the ones a token uses."""
    shapes = _model_shapes(folder)
    if shapes is None:
        return None
    counts = {"tensors": len(shapes), "total": sum(math.prod(shape) for shape in shapes.values())}
    experts, active = (config or {}).get("num_experts"), (config or {}).get("num_experts_per_tok")
    if experts and active:  # stacked expert weights: [num_experts, out, in]
        stacked = sum(math.prod(s) for s in shapes.values() if len(s) == 3 and s[0] == experts)
        counts["active"] = counts["total"] - stacked * (experts - active) // experts
    return counts


class _Tensors:
    """One checkpoint's model tensors for ``diff``: read one at a time from safetensors, or, for a
    sharded (FSDP) checkpoint, stitched in memory once by torch.distributed.checkpoint."""

    def __init__(self, folder: Path):
        self.folder, self.shapes = folder, _model_shapes(folder)
        if self.shapes is None:
            raise CheckpointError(f"{folder}: no model weights here ({MODEL_WEIGHTS} or FSDP shards)")
        self._file = self._full = None
        self._files = []

    def __enter__(self):
        stored = weight_files(self.folder)
        if stored:
            from .stored_tensors import open_tensor_file

            self._files = [open_tensor_file(f).__enter__() for f in stored]
            self._file = {name: reader for reader in self._files for name in reader.keys()}
        else:
            from .weights import _dcp_dir, consolidate_sharded, normalize_state_dict

            self._full = normalize_state_dict(consolidate_sharded(_dcp_dir(self.folder)))
        return self

    def __exit__(self, *exc):
        for reader in self._files:
            reader.__exit__(*exc)
        self._files, self._file, self._full = [], None, None

    def get(self, key: str):
        return self._file[key].get_tensor(key) if self._file is not None else self._full[key]


def inspect(folder: str | Path) -> dict:
    """Everything a checkpoint says about itself, as one JSON-able dict."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    position = _optional_state(folder, DATALOADER)
    if isinstance(position, dict):
        position = {k: v for k, v in position.items() if k != "epoch_generator_state"}
    named_states = {}
    for name in manifest["files"]:
        stem, dot, suffix = name.rpartition(".")
        if "/" not in name and dot + suffix in STATE_SUFFIXES[:1] and name not in KNOWN_JSON:
            named_states[stem] = _optional_state(folder, stem)
    schedulers = _optional_state(folder, SCHEDULERS) or {}
    model_config = read_json(folder / MODEL_CONFIG) if (folder / MODEL_CONFIG).is_file() else None
    return {
        "path": str(folder), "format_version": manifest["format_version"], "step": manifest.get("step"),
        "saved_because": manifest.get("reasons", []), "metrics": manifest.get("metrics") or {},
        "best": manifest.get("best"), "data_position": position, "states": named_states,
        "weights_only": manifest.get(WEIGHTS_ONLY),
        "environment": manifest.get("environment", {}), "parameters": _tensor_count(folder, model_config),
        "files": {n: {"size": i["size"], "role": i["role"]} for n, i in manifest["files"].items()},
        "total_bytes": sum(i["size"] for i in manifest["files"].values()),
        "optimizers": _optimizer_summary(folder),
        "schedulers": {n: {"last_epoch": s.get("last_epoch"), "base_lrs": s.get("base_lrs"),
                           "last_lr": s.get("_last_lr")} for n, s in schedulers.items() if isinstance(s, dict)},
        "grad_scaler": SCALER in manifest["files"],
        "sharded_weights": not weight_files(folder),
        "model_config": model_config,
        "run_config": read_json(folder / RUN_CONFIG) if (folder / RUN_CONFIG).is_file() else None,
    }


def _json_or_empty(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _dict_diff(a: dict, b: dict, ignore: set[str] = frozenset()) -> list[str]:
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def diff(a: str | Path, b: str | Path) -> dict:
    """Config differences, architecture differences (keys/shapes) and per-tensor change norms."""
    a, b = Path(a), Path(b)
    meta_keys = {"transformers_version", "architectures", "dtype", "torch_dtype"}
    changes = []
    with _Tensors(a) as fa, _Tensors(b) as fb:
        ha, hb = fa.shapes, fb.shapes
        only_a, only_b = sorted(set(ha) - set(hb)), sorted(set(hb) - set(ha))
        shapes = [f"{k}: {ha[k]} -> {hb[k]}" for k in sorted(set(ha) & set(hb)) if ha[k] != hb[k]]
        for key in sorted(set(ha) & set(hb)):
            if ha[key] != hb[key]:
                continue
            ta, tb = fa.get(key).float(), fb.get(key).float()
            delta = (tb - ta).norm().item()
            base = ta.norm().item()
            changes.append({"tensor": key, "change_norm": delta, "relative": delta / base if base else math.inf})
    return {
        "run_config": _dict_diff(_json_or_empty(a / RUN_CONFIG), _json_or_empty(b / RUN_CONFIG)),
        "model_config": _dict_diff(_json_or_empty(a / MODEL_CONFIG), _json_or_empty(b / MODEL_CONFIG), meta_keys),
        "only_in_a": only_a, "only_in_b": only_b, "shape_changes": shapes,
        "tensor_changes": sorted(changes, key=lambda c: -c["relative"]),
    }
