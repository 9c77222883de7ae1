"""Optimizer state by name: ``optimizer.safetensors`` (every state tensor) + ``optimizer.json``.

Accelerate saves optimizer state with ``torch.save`` under positional names (``optimizer_1.bin``);
this layout writes at disk speed, loads without unpickling anything, and names everything: each
optimizer by the name the Checkpointer was given, each tensor ``<parameter name>::<state key>``.
Parameters are named by the optimizer's own ``param_names`` (torch optimizers built from
``named_parameters()``) or else by the model's parameter names, so a plain ``torch.optim.AdamW(model.parameters())``
is saved by name too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .format import OPTIMIZER_GROUPS, OPTIMIZER_TENSORS, tensor_file
from .stored_tensors import read_tensor_file, read_verified
from .io import CheckpointError, like_parameter, read_json, write_json

FORMAT = "accel_trainer.optimizer/2"


def parameter_names(name: str, optimizer, names_by_id: dict[int, str]) -> list[list[str]]:
    """The name of every parameter of ``optimizer``, group by group.

    A parameter that is not in the model (``names_by_id``) and has no ``param_names`` entry is named
    by position, ``<optimizer>.<group>.<index>``, and is then matched by position on load.
    """
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        own = group.get("param_names")
        groups.append(list(own) if own else [names_by_id.get(id(p), f"{name}.{gi}.{pi}")
                                              for pi, p in enumerate(group["params"])])
    return groups


def split_state(optimizers: dict, names_by_id: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Named optimizers -> (tensors keyed ``<param>::<key>``, sorted; JSON-able description).

    Sorted keys make the file a function of the state alone (not of the order in which state was
    created), so identical states give identical bytes.

    Raises:
        CheckpointError: a parameter held by two optimizers (its state would be ambiguous).
    """
    tensors, description, owner = {}, {"format": FORMAT, "optimizers": {}}, {}
    for opt_name, opt in optimizers.items():
        state_dict = opt.state_dict()
        names = parameter_names(opt_name, opt, names_by_id)
        groups, scalars = [], {}
        for saved_group, group_names in zip(state_dict["param_groups"], names):
            groups.append({**saved_group, "param_names": group_names})
            for pid, pname in zip(saved_group["params"], group_names):
                if pname in owner:
                    raise CheckpointError(f"parameter {pname} is in optimizers {owner[pname]!r} and {opt_name!r}; "
                                          "give each parameter to one optimizer")
                owner[pname] = opt_name
                for key, value in state_dict["state"].get(pid, {}).items():
                    if torch.is_tensor(value):
                        tensors[f"{pname}::{key}"] = value
                    else:
                        scalars.setdefault(pname, {})[key] = value
        description["optimizers"][opt_name] = {"param_groups": groups, "scalars": scalars}
    return dict(sorted(tensors.items())), description


def write_description(folder: Path, description: dict) -> None:
    write_json(folder / OPTIMIZER_GROUPS, description)


def read_description(folder: Path) -> dict:
    description = read_json(folder / OPTIMIZER_GROUPS)
    if description.get("format") != FORMAT:
        raise CheckpointError(f"{folder / OPTIMIZER_GROUPS}: format {description.get('format')!r}, "
                              f"this accel_trainer reads {FORMAT!r}")
    return description


def load_into(folder: Path, optimizers: dict, names_by_id: dict[int, str], device: str = "cpu",
              digests: dict[str, str] | None = None) -> None:
    """Load every named optimizer from ``folder`` after checking that names, groups, parameters and
    state shapes match; nothing is loaded unless everything matches.

    Args:
        digests: file name -> saved checksum: the tensor file is then hashed as it is read (one pass)
            and nothing is loaded unless it matches.

    Raises:
        CheckpointError: naming the optimizer, group and parameters that differ.
        DamagedFile: the tensor file is not the one saved (no optimizer was changed).
    """
    description = read_description(folder)
    saved_all = description["optimizers"]
    missing, extra = sorted(set(optimizers) - set(saved_all)), sorted(set(saved_all) - set(optimizers))
    if missing or extra:
        raise CheckpointError(f"{folder / OPTIMIZER_GROUPS}: holds optimizers {sorted(saved_all)} but this run has "
                              f"{sorted(optimizers)} (missing {missing}, unexpected {extra})")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    stored = tensor_file(folder, OPTIMIZER_TENSORS)
    if stored is None:
        raise CheckpointError(f"{folder}: no {OPTIMIZER_TENSORS} (nor its compressed form) for the optimizer state; "
                              "resume with --reset_optimizer to start the optimizer fresh")
    digest = (digests or {}).get(stored.name)
    read = read_verified(stored, digest, device) if digest else read_tensor_file(stored, device=device).items()
    for key, value in read:
        pname, _, item = key.rpartition("::")
        tensors.setdefault(pname, {})[item] = value
    states = {}
    for opt_name, opt in optimizers.items():
        saved = saved_all[opt_name]
        names = parameter_names(opt_name, opt, names_by_id)
        _check_matches(opt_name, opt, names, saved, tensors)
        state, pid = {}, 0
        params = [p for group in opt.param_groups for p in group["params"]]
        for group_names in names:
            for pname in group_names:
                values = {**saved["scalars"].get(pname, {}), **tensors.get(pname, {})}
                if values:  # a whole tensor becomes this rank's slice where the parameter is a DTensor
                    state[pid] = {k: like_parameter(params[pid], v) for k, v in values.items()}
                pid += 1
        regrouped = [g.get("param_names", []) for g in saved["param_groups"]] != names
        groups, offset = [], 0
        for gi, (group_names, current) in enumerate(zip(names, opt.param_groups)):
            if regrouped:  # same parameters, grouped otherwise (say, a weight-decay split): this run's groups
                group = {k: v for k, v in current.items() if k != "params"}
            else:  # JSON gives back lists where the optimizer had tuples (betas): restore the type it uses.
                group = {k: tuple(v) if isinstance(v, list) and isinstance(current.get(k), tuple) else v
                         for k, v in saved["param_groups"][gi].items()}
            groups.append({**group, "params": list(range(offset, offset + len(group_names)))})
            offset += len(group_names)
        states[opt_name] = {"state": state, "param_groups": groups}
    for opt_name, opt in optimizers.items():
        opt.load_state_dict(states[opt_name])


def _check_matches(opt_name: str, opt, names: list[list[str]], saved: dict, tensors: dict) -> None:
    where = f"optimizer {opt_name!r}"
    params = {pname: p for group_names, group in zip(names, opt.param_groups)
              for pname, p in zip(group_names, group["params"])}
    saved_groups = [group.get("param_names", []) for group in saved["param_groups"]]
    if len(names) != len(saved_groups) or names != saved_groups:
        # State is kept by parameter name: the same parameters in other groups load (this run's
        # groups and hyperparameters apply); otherwise compare the whole set.
        now_all = [n for group in names for n in group]
        then_all = [n for group in saved_groups for n in group]
        if sorted(now_all) == sorted(then_all) and len(set(now_all)) == len(now_all):
            names, saved_groups = [now_all], [now_all]
        elif len(names) != len(saved_groups):
            names, saved_groups = [now_all], [then_all]
    for gi, (now, then) in enumerate(zip(names, saved_groups)):
        if now != then:
            gone, new = sorted(set(then) - set(now)), sorted(set(now) - set(then))
            raise CheckpointError(
                f"{where} group {gi}: parameters differ from the checkpoint (only in checkpoint: {gone[:8]}, "
                f"only in this run: {new[:8]}). "
                "Pass --reset_optimizer (or exclude the optimizer) to keep the weights and start it fresh")
    for group_names in names:
        for pname in group_names:
            p = params.get(pname)
            for key, value in tensors.get(pname, {}).items() if p is not None else ():
                if value.ndim > 0 and tuple(value.shape) != tuple(p.shape):
                    raise CheckpointError(f"{where}: state {key!r} of {pname} has shape {tuple(value.shape)} but the "
                                          f"parameter has {tuple(p.shape)}")
