"""Optimizer state as ``optimizer.safetensors`` (tensors keyed by parameter name) + ``optimizer.json``.

Accelerate saves optimizer state with ``torch.save`` (pickle + zip CRC32), the slow part of its
save_state; this layout writes at disk speed, loads without unpickling anything, and names every
tensor ``<parameter name>::<state key>`` so the file says what it holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .io import CheckpointError, read_json, write_json

TENSORS = "optimizer.safetensors"
GROUPS = "optimizer.json"
FORMAT = "accel_trainer.optimizer/1"


def split_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Standard optimizer state dict -> (named tensors, JSON-able description)."""
    names = {}
    for group in state_dict["param_groups"]:
        names.update(zip(group["params"], group["param_names"]))
    tensors, scalars = {}, {}
    for pid, state in state_dict["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{names[pid]}::{key}"] = value
            else:
                scalars.setdefault(names[pid], {})[key] = value
    return tensors, {"format": FORMAT, "param_groups": state_dict["param_groups"], "scalars": scalars}


def read_state(folder: Path, device: str | torch.device = "cpu") -> dict:
    """The standard optimizer state dict back from the two files (tensors read one at a time)."""
    description = read_json(folder / GROUPS)
    if description.get("format") != FORMAT:
        raise CheckpointError(f"{folder / GROUPS}: format {description.get('format')!r}, expected {FORMAT!r}")
    ids = {}
    for group in description["param_groups"]:
        ids.update(zip(group["param_names"], group["params"]))
    state: dict[int, dict] = {}
    with safe_open(folder / TENSORS, framework="pt", device=str(device)) as f:
        for key in f.keys():
            name, _, item = key.rpartition("::")
            if name not in ids:
                raise CheckpointError(f"{folder / TENSORS}: tensor {key!r} names no parameter of {folder / GROUPS}")
            state.setdefault(ids[name], {})[item] = f.get_tensor(key)
    for name, values in description["scalars"].items():
        state.setdefault(ids[name], {}).update(values)
    return {"state": state, "param_groups": description["param_groups"]}


def write_description(folder: Path, description: dict) -> None:
    write_json(folder / GROUPS, json.loads(json.dumps(description)))
