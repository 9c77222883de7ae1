"""Bring your run: a ``.pt`` checkpoint of another trainer becomes an ordinary ``step-N`` checkpoint
here, with its optimizer state, so a run in flight moves without restarting its optimizer.

The file is read as data only (``torch.load(weights_only=True)``). What the common layouts hold is
found by name (``model_state_dict``/``model``/``state_dict``; ``optimizer_state_dict``/``optimizer``/
``optimizer_states``; ``scheduler_state_dict``/``scheduler_states``; ``scaler_state_dict``;
``step``/``global_step``/``iter_num``; ``epoch``; ``best_val_loss``; ``val_loss``;
``train_ema_loss``; ``config``; ``metrics``; a token count), and then:

* the weights load by name (``module.`` and ``_orig_mod.`` stripped), exactly: every tensor of the
  model, each of its shape;
* the optimizer state goes from positions to names. A torch optimizer numbers its parameters in the
  order it was given them; the old trainers gave them in ``named_parameters()`` order, either all to
  one optimizer, or split by the Muon/AdamW rule we use (Muon's first, as seed 001 wrote them), or
  in nanoGPT's two groups (matrices first, then the rest). The order whose shapes all fit is used;
  none fitting is refused naming the first mismatch (``--reset_optimizer`` imports without it). A
  run that had one Adam keeps Adam's moments: every parameter goes to AdamW unless
  ``--muon_params``/``--adamw_params`` say otherwise;
* the step (``step``/``global_step``, else the epoch), the epoch (the data continues at the start of
  the next one), tokens seen, the best metric and the training loss EMA become our counters; the LR
  schedule is a function of the step here, so its position follows; the old scheduler, scaler,
  config and metrics are kept under ``imported_from`` in ``run_config.json``.

A file that pickles a class (a config dataclass, say) is refused naming the class; after reading
its code, ``--trust_pickled_class module.Class`` reads that one class's fields as a plain dict (its
code still never runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (CheckpointConfig, CheckpointError, Checkpointer, hash_file, load_state_into,
                         normalize_state_dict)
from .errors import ConfigError

MODEL_KEYS = ("model_state_dict", "model", "state_dict", "module")
OPTIMIZER_KEYS = ("optimizer_states", "optimizers", "optimizer_state_dict", "optimizer")
SCHEDULER_KEYS = ("scheduler_states", "schedulers", "scheduler_state_dict", "scheduler", "lr_scheduler")
SCALER_KEYS = ("scaler_state_dict", "scaler", "grad_scaler")
STEP_KEYS = ("global_step", "step", "iter_num", "iteration")
TOKEN_KEYS = ("tokens_seen", "tokens", "total_tokens", "token_count", "tokens_processed", "num_tokens")
BEST_KEYS = ("best_val_loss", "best_loss", "best_metric")
EMA_KEYS = ("train_ema_loss", "ema_loss")
CONFIG_KEYS = ("config", "model_config", "model_args", "args")
# Suffixes of files that are a single old checkpoint (not one of ours).
SINGLE_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ImportedObject:
    """What a trusted pickled class becomes: its fields as a dict, no code of the class run."""

    def __setstate__(self, state):
        self.__dict__["fields"] = state if isinstance(state, dict) else {"state": state}


@dataclass
class OldCheckpoint:
    """What an old ``.pt`` checkpoint holds, found by name."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizers: list[dict] = field(default_factory=list)
    optimizer_names: list[str] = field(default_factory=list)
    schedulers: list = field(default_factory=list)
    scaler: dict | None = None
    step: int | None = None
    epoch: int | None = None
    tokens: int | None = None
    best: float | None = None
    val_loss: float | None = None
    ema_loss: float | None = None
    config: Any = None
    metrics: Any = None
    other: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        """The step the imported checkpoint is named by: the file's step, else its epoch."""
        return int(self.step if self.step is not None else self.epoch or 0)


def read_old_checkpoint(path: str | Path, trust: tuple[str, ...] = ()) -> OldCheckpoint:
    """An old single-file checkpoint, as data.

    Raises:
        CheckpointError: not a file, a pickled class not trusted (named), or no weights found.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # not a torch zip file at all
        raise CheckpointError(f"{path}: not a readable torch file ({type(err).__name__}: {err})") from None
    unsafe = [g for g in unsafe if not _harmless(g)]
    untrusted = [g for g in unsafe if g not in trust]
    if untrusted:
        raise CheckpointError(
            f"{path}: holds a pickled class {untrusted[0]}, whose code would run if it were loaded as torch.load "
            "does by default; re-save the file with that object as a plain dict (e.g. dataclasses.asdict(config)), "
            f"or, after reading that class's code, pass --trust_pickled_class {untrusted[0]} (its fields are then "
            "read as a dict; its code still never runs)")
    try:
        with torch.serialization.safe_globals([(ImportedObject, name) for name in unsafe]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: could not be loaded as data ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    model_key = next((k for k in MODEL_KEYS if isinstance(obj.get(k), dict)), None)
    if model_key is None:
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return OldCheckpoint(path, normalize_state_dict(obj))
        raise CheckpointError(f"{path}: found no weights (looked for {list(MODEL_KEYS)}; the file has "
                              f"{sorted(obj)[:10]})")
    old = OldCheckpoint(path, normalize_state_dict(obj[model_key]))
    used = {model_key}
    key = next((k for k in OPTIMIZER_KEYS if k in obj and obj[k] is not None), None)
    if key:
        used.add(key)
        value = obj[key]
        if isinstance(value, dict) and "state" in value:
            old.optimizers, old.optimizer_names = [value], ["optimizer"]
        elif isinstance(value, dict):
            old.optimizers, old.optimizer_names = list(value.values()), [str(k) for k in value]
        else:
            old.optimizers = list(value)
            old.optimizer_names = [f"optimizer {i}" for i in range(len(old.optimizers))]
    key = next((k for k in SCHEDULER_KEYS if k in obj and obj[k] is not None), None)
    if key:
        used.add(key)
        old.schedulers = obj[key] if isinstance(obj[key], (list, tuple)) else [obj[key]]
    key = next((k for k in SCALER_KEYS if isinstance(obj.get(k), dict)), None)
    if key:
        used.add(key)
        old.scaler = obj[key]
    for keys, attr, kind in ((STEP_KEYS, "step", int), (TOKEN_KEYS, "tokens", int), (BEST_KEYS, "best", float),
                             (EMA_KEYS, "ema_loss", float), (("val_loss",), "val_loss", float),
                             (("epoch",), "epoch", int)):
        key = next((k for k in keys if _number(obj.get(k)) is not None), None)
        if key:
            used.add(key)
            setattr(old, attr, kind(_number(obj[key])))
    key = next((k for k in CONFIG_KEYS if k in obj), None)
    if key:
        used.add(key)
        old.config = plain(obj[key])
    if "metrics" in obj:
        used.add("metrics")
        old.metrics = plain(obj["metrics"])
        if old.val_loss is None and isinstance(old.metrics, dict):
            old.val_loss = _number(old.metrics.get("val_loss"))
    old.other = {k: plain(v) for k, v in obj.items() if k not in used and not torch.is_tensor(v)}
    return old


def _harmless(name: str) -> bool:
    return name.startswith(("torch.", "collections.OrderedDict", "builtins.", "numpy.", "_codecs.encode"))


def _number(value):
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plain(value):
    """JSON-able copy: trusted objects as their fields, tensors as their shape, the rest as text."""
    if isinstance(value, ImportedObject):
        return plain(value.__dict__.get("fields", {}))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else f"tensor{list(value.shape)}"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ------------------------------------------------------------------------------ optimizer state
def _kind(state_dict: dict) -> str:
    """``adam`` (exp_avg moments), ``momentum`` (a momentum buffer: Muon, SGD) or ``none`` (no state)."""
    keys = {k for s in state_dict.get("state", {}).values() for k in s}
    return "adam" if "exp_avg" in keys else "momentum" if "momentum_buffer" in keys else "none"


def _positions(state_dict: dict) -> list[int]:
    return [i for g in state_dict["param_groups"] for i in g["params"]]


def _orders(names: list[str], params: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The parameter orders an old trainer may have given its optimizer."""
    matrices_first = [n for n in names if params[n].ndim >= 2] + [n for n in names if params[n].ndim < 2]
    return {"named_parameters() order": names, "matrices first (nanoGPT's decay groups)": matrices_first}


def _first_mismatch(state_dict: dict, order: list[str], params: dict[str, torch.Tensor]) -> str | None:
    positions = _positions(state_dict)
    if len(positions) != len(order):
        return f"it holds {len(positions)} parameters, the model's share is {len(order)}"
    for position, name in zip(positions, order):
        for key, value in state_dict.get("state", {}).get(position, {}).items():
            if torch.is_tensor(value) and value.ndim > 0 and tuple(value.shape) != tuple(params[name].shape):
                return (f"position {position} ({key} {list(value.shape)}) is not {name} "
                        f"({list(params[name].shape)})")
    return None


def map_optimizer_state(old: OldCheckpoint, model: torch.nn.Module, assignments) -> dict[str, dict]:
    """``{parameter name: state}`` of the old optimizers, by name, for our optimizer that owns each.

    Raises:
        CheckpointError: the old optimizers do not fit the model (the first mismatch named), or a
            parameter whose old state is another optimizer's kind than ours.
    """
    params = dict(model.named_parameters())
    ours = {a.name: a.optimizer for a in assignments}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    kinds = [_kind(sd) for sd in old.optimizers]
    if len(old.optimizers) == 1:
        shares = [trainable]
    elif len(old.optimizers) == 2:  # Muon's first (seed 001), unless their state says otherwise
        muon_first = kinds != ["adam", "momentum"]
        muon = [n for n in trainable if ours[n] == "muon"]
        adamw = [n for n in trainable if ours[n] == "adamw"]
        shares = [muon, adamw] if muon_first else [adamw, muon]
    else:
        raise CheckpointError(f"{old.path}: {len(old.optimizers)} optimizers; an import maps one, or Muon and "
                              "AdamW; pass --reset_optimizer to import weights and counters only")
    state: dict[str, dict] = {}
    for sd, share, name, kind in zip(old.optimizers, shares, old.optimizer_names, kinds):
        problems = {}
        for label, order in _orders(share, params).items():
            problem = _first_mismatch(sd, order, params)
            if problem is None:
                break
            problems[label] = problem
        else:
            first = next(iter(problems.values()))
            raise CheckpointError(f"{old.path}: {name} does not fit this model: {first}; check the model flags "
                                  "(or pass --reset_optimizer to import weights and counters only)")
        for position, param in zip(_positions(sd), order):
            saved = sd.get("state", {}).get(position)
            if not saved:
                continue
            want = "adam" if ours[param] == "adamw" else "momentum"
            if kind != want:
                raise CheckpointError(
                    f"{old.path}: {param} has {kind} state ({name}) but goes to {ours[param]} here; give the "
                    f"optimizer assignment of the old run (--adamw_params '{param}' or --muon_params), or pass "
                    "--reset_optimizer")
            state[param] = {k: (v.float() if k == "step" and torch.is_tensor(v) else
                                torch.tensor(float(v)) if k == "step" else v) for k, v in saved.items()}
    return state


# --------------------------------------------------------------------------------------- the import
class _DataPosition:
    """The loader position an imported run starts at: the beginning of the epoch after the file's."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_in_epoch": 0, "global_batch_size": None,
                "epoch_generator_state": None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]


def import_into(old: OldCheckpoint, accelerator, plan, output_dir: str | Path, run_config: dict, *,
                muon_params=(), adamw_params=(), reset_optimizer: bool = False, print_fn=print,
                digest: str | None = None) -> Path:
    """Write ``old`` as ``<output_dir>/checkpoints/step-N`` for the model ``plan`` builds (a
    collective call: every process calls it; the main process writes).

    Returns:
        The checkpoint folder.

    Raises:
        CheckpointError: weights or optimizer state that do not fit, naming the first difference.
    """
    from .optim import OptimizerSettings, assign_parameters, assignment_summary, build_optimizers
    from .train_state import TrainState

    model = plan.build()
    report = load_state_into(model, old.model, strict=False)
    if not report.exact:
        raise CheckpointError(f"{old.path}: its weights do not fit {plan.name}:\n{report}\ncheck the model flags "
                              "(--preset, --config_name, --config_overrides, the model_factory's config)")
    if not (muon_params or adamw_params) and all(_kind(sd) in ("adam", "none") for sd in old.optimizers):
        adamw_params = (".",)  # one Adam: its moments carry on, for every parameter
    try:
        assignments = assign_parameters(model, muon_params, adamw_params, rule=plan.family.parameter_rule)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    optimizers = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3), assignments)
    mapped = {} if reset_optimizer or not old.optimizers else map_optimizer_state(old, model, assignments)
    params = dict(model.named_parameters())
    for name, state in mapped.items():
        owner = optimizers.optimizers["adamw" if "exp_avg" in state else "muon"]
        owner.state[params[name]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    epoch = old.epoch if old.epoch is not None else 0
    ema = old.ema_loss
    train_state = TrainState(global_step=old.n, tokens_seen=old.tokens or 0,
                             ema_loss=torch.tensor(ema, dtype=torch.float32) if ema is not None else None)
    digest = digest or hash_file(old.path)  # the caller may have hashed it already (one read of a big file)
    config = {**run_config, "optimizer_assignment": assignment_summary(assignments),
              "muon_params": list(muon_params) or None, "adamw_params": list(adamw_params) or None,
              "imported_from": {"path": str(old.path), "xxh3_128": digest, "step": old.step, "epoch": old.epoch,
                                "optimizers": old.optimizer_names if not reset_optimizer else [],
                                "schedulers": plain(old.schedulers), "scaler": plain(old.scaler),
                                "config": old.config, "metrics": old.metrics, "val_loss": old.val_loss,
                                "best": old.best, "other": old.other}}
    ckpt = Checkpointer(accelerator, output_dir, model=model, optimizer=optimizers.optimizers,
                        dataloader=_DataPosition(epoch), extra={"trainer_state": train_state}, config=config,
                        settings=CheckpointConfig(lock=False),
                        model_config=plan.config_json() if plan.source == "custom" else None)
    if old.best is not None:
        ckpt.best = {"metric": "val_loss", "value": old.best, "step": None}
    try:
        folder = ckpt.save(old.n, metrics={"val_loss": old.val_loss} if old.val_loss is not None else None,
                           reason="imported", wait=True)
    finally:
        ckpt.close()
    if folder is None:
        raise CheckpointError(f"{output_dir}: the imported checkpoint could not be written (see the warning)")
    restored = ["weights"] + (["optimizer state"] if mapped else []) + [
        what for what, there in (("step", old.step is not None), ("epoch", old.epoch is not None),
                                 ("tokens seen", old.tokens is not None), ("best val loss", old.best is not None),
                                 ("training loss EMA", old.ema_loss is not None)) if there]
    kept = [k for k in ("schedulers", "scaler", "config", "metrics") if getattr(old, k)]
    print_fn(f"imported {old.path} as {folder}: {', '.join(restored)}"
             + (f"; kept under imported_from in run_config.json: {', '.join(kept)}" if kept else ""))
    return folder


@dataclass
class ImportArguments:
    """``accel-trainer import OLD.pt --output_dir RUN`` (with the recipe's model flags)."""

    checkpoint: str = field(metadata={"help": "The old .pt checkpoint to import."})
    output_dir: str = field(metadata={"help": "The run folder: the import becomes <output_dir>/checkpoints/step-N."})
    reset_optimizer: bool = field(default=False, metadata={"help": "Import weights and counters, not the optimizer "
                                                                   "state."})
    trust_pickled_class: list[str] | None = field(default=None, metadata={
        "help": "A pickled class the file holds (module.Class), read as a dict of its fields after you read its "
                "code (its code never runs)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "The tokenizer whose vocabulary sizes a "
                                                                       "preset (default: byte)."})


def main(argv: list[str] | None = None, *, model_factory=None, model_config=None, presets: dict | None = None) -> int:
    """``accel-trainer import``: one process, the main one writes; returns the exit status (2: bad input).

    With ``model_factory``/``model_config`` (your own module), as the recipes take them.
    """
    import sys

    from accelerate import Accelerator

    from .config import ModelArguments, parse_args, to_dict
    from .data import load_tokenizer
    from .errors import InputError
    from .models import plan_model

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # accel-trainer import OLD.pt ...
        argv = ["--checkpoint", *argv]
    model_args, args = parse_args((ModelArguments, ImportArguments), argv)
    try:
        old = read_old_checkpoint(args.checkpoint, tuple(args.trust_pickled_class or ()))
        plan = plan_model(model_args, load_tokenizer(args.tokenizer_name or "byte"), presets, model_factory,
                          model_config)
        import_into(old, Accelerator(cpu=True), plan, args.output_dir, to_dict(model_args),
                    muon_params=tuple(model_args.muon_params or ()), adamw_params=tuple(model_args.adamw_params or ()),
                    reset_optimizer=args.reset_optimizer)
    except InputError as err:
        print(f"accel-trainer import: {err}", file=sys.stderr)
        return 2
    return 0


def is_single_file_checkpoint(spec: str | Path | None) -> bool:
    """``--resume_from_checkpoint OLD.pt``: a file of another trainer, not one of our folders."""
    return spec is not None and Path(str(spec)).suffix in SINGLE_FILE_SUFFIXES and Path(str(spec)).is_file()


__all__ = ["ImportArguments", "ImportedObject", "OldCheckpoint", "import_into", "is_single_file_checkpoint", "main",
           "map_optimizer_state", "read_old_checkpoint"]
