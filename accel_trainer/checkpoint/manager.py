"""The Checkpointer: saves and restores a run's whole state through Accelerate's save_state/load_state.

Save protocol (a process killed at any instant leaves ``latest`` at a complete checkpoint):
  1. all ranks write into ``checkpoints/.tmp-step-N/`` (``accelerator.save_state``; our pre-save
     hook adds the named state: trainer counters, schedulers, configs, and every rank's RNG);
  2. every rank fsyncs what it wrote; barrier;
  3. the main process fsyncs the folder, writes ``manifest.json`` (size + sha256 + role per file) and
     then the ``COMPLETE`` marker, renames the folder to ``step-N``, fsyncs ``checkpoints/``, and
     only then moves ``latest`` (and ``best``) by atomic rename; then applies retention.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from . import rng
from .io import CheckpointError, check_dcp_metadata_is_data, check_pickle_is_data, fsync_dir, fsync_file, fsync_tree, read_json, write_json
from .layout import (TMP_PREFIX, apply_retention, checkpoints_dir, ensure_dir, remove_stale_temporaries,
                     resolve, step_dir_name, write_pointer)
from .manifest import write_complete_marker, write_manifest
from .weights import load_state_into, normalize_state_dict, read_weights

TRAINER_STATE = "trainer_state.json"
SCHEDULERS = "schedulers.json"
RUN_CONFIG = "run_config.json"
MODEL_CONFIG = "config.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pkl", ".pth")
# Hyperparameters that follow the current flags on resume (the checkpoint supplies state, not these).
FLAG_HYPERPARAMETERS = ("weight_decay", "momentum", "nesterov", "ns_steps", "betas", "eps")
# Run-config keys that may differ on resume without comment (they say where/how, not what).
QUIET_KEYS = {"resume_from_checkpoint", "output_dir", "disable_tqdm", "report_to", "run_name"}


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def architecture_differences(saved: dict, current: dict) -> list[str]:
    from ..models.configuration_moe import ARCHITECTURE_KEYS

    return [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
            for k in ARCHITECTURE_KEYS if saved.get(k) != current.get(k)]


class Checkpointer:
    """Owns ``<output_dir>/checkpoints`` for one trainer.

    Args:
        trainer: the :class:`~accel_trainer.trainer.Trainer` whose state is saved (model, optimizer
            container, schedulers, counters, run config).
        output_dir: the run's output dir.
        save_total_limit: keep this many newest checkpoints (plus latest and best); None keeps all.
        keep_every_n_steps: also keep every checkpoint whose step is a multiple of this.
    """

    def __init__(self, trainer, output_dir: str | Path, save_total_limit: int | None = None,
                 keep_every_n_steps: int | None = None):
        self.trainer = trainer
        self.accelerator = trainer.accelerator
        self.root = checkpoints_dir(output_dir)
        self.save_total_limit = save_total_limit
        self.keep_every_n_steps = keep_every_n_steps
        self.last_saved_step: int | None = None
        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)

    # ------------------------------------------------------------------------------------- saving
    def save(self, reasons: list[str]) -> Path:
        """Save the whole state at the current step (a collective call: every rank must call it)."""
        acc, trainer = self.accelerator, self.trainer
        step = trainer.state.global_step
        trainer.sync_tokens()
        trainer.state.ema_loss = None if trainer._ema is None else float(trainer._ema.item())
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        if acc.is_main_process:
            ensure_dir(self.root)
            remove_stale_temporaries(self.root)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        # Each rank makes its own files durable (on a shared filesystem the main rank's tree fsync
        # below covers the rest, on node-local disks this is the only fsync they get).
        for name in (rng_file(acc.process_index), f"random_states_{acc.process_index}.pkl"):
            if (tmp / name).exists():
                fsync_file(tmp / name)
        acc.wait_for_everyone()
        if acc.is_main_process:
            fsync_tree(tmp)
            manifest = write_manifest(tmp, step=step, reasons=reasons, accelerator=acc)
            write_complete_marker(tmp, manifest)
            fsync_dir(tmp)
            replaced = None
            if final.exists():  # the same step saved again (e.g. emergency after periodic): swap
                replaced = self.root / f"{TMP_PREFIX}replaced-{final.name}"
                final.rename(replaced)
            tmp.rename(final)
            fsync_dir(self.root)
            write_pointer(self.root, "latest", final)
            if "best" in reasons:
                write_pointer(self.root, "best", final)
            if replaced is not None:
                shutil.rmtree(replaced)
            apply_retention(self.root, keep_last=self.save_total_limit, keep_every_n_steps=self.keep_every_n_steps)
        acc.wait_for_everyone()
        self.last_saved_step = step
        acc.print(f"checkpoint: saved {final} ({', '.join(reasons)})")
        return final

    def _save_hook(self, models, weights, output_dir) -> None:
        """Accelerate pre-save hook: normalise weight names and write our named state files."""
        for i, state in enumerate(weights):
            # DDP/compile wrappers prefix names; strip them so any world size loads the file.
            normalized = normalize_state_dict(state)
            state.clear()
            state.update(normalized)
        out, acc, trainer = Path(output_dir), self.accelerator, self.trainer
        torch.save(rng.capture(), out / rng_file(acc.process_index))
        if acc.is_main_process:
            write_json(out / TRAINER_STATE, trainer.state.state_dict())
            write_json(out / SCHEDULERS, trainer.schedulers.state_dict())
            write_json(out / RUN_CONFIG, trainer.run_config)
            acc.unwrap_model(trainer.model).config.to_json_file(out / MODEL_CONFIG)

    # ------------------------------------------------------------------------------------ loading
    def resolve(self, spec: str) -> Path | None:
        """Resolve on the main process and share the answer, so every rank loads the same folder."""
        acc = self.accelerator
        answer = [None, None]
        if acc.is_main_process:
            try:
                found = resolve(spec, self.root.parent)
                answer = [None if found.path is None else str(found.path), None]
            except CheckpointError as err:
                answer = [None, str(err)]
        if acc.num_processes > 1:
            broadcast_object_list(answer, from_process=0)
        if answer[1]:
            raise CheckpointError(answer[1])
        return None if answer[0] is None else Path(answer[0])

    def resume(self, spec: str, reset_optimizer: bool = False) -> Path | None:
        """Restore everything from ``spec`` (see :func:`layout.resolve`); None means a fresh start.

        Raises:
            CheckpointError: unknown/invalid checkpoint, architecture change, or optimizer mismatch.
        """
        acc, trainer = self.accelerator, self.trainer
        folder = self.resolve(spec)
        if folder is None:
            acc.print(f"--resume_from_checkpoint={spec}: no checkpoint under {self.root} yet; starting fresh")
            return None
        self._check_compatible(folder)
        self._print_config_changes(folder)
        flags = self._snapshot_flag_hyperparameters()
        if reset_optimizer:
            acc.print("--reset_optimizer: loading weights, counters and RNG; optimizer state starts fresh")
            state, _ = read_weights(folder)
            load_state_into(acc.unwrap_model(trainer.model), state, strict=True)
        else:
            try:
                acc.load_state(str(folder))
            except ValueError as err:  # OptimizersContainer refuses mismatched groups by name
                raise CheckpointError(f"{folder}/optimizer.bin: {err}. Pass --reset_optimizer to keep the "
                                      "weights and start the optimizer fresh") from None
        trainer.state.load_state_dict(read_json(folder / TRAINER_STATE))
        trainer.total_steps = trainer.plan_total_steps()  # before the LR is recomputed from the schedule
        trainer.schedulers.load_state_dict(read_json(folder / SCHEDULERS))
        self._apply_flag_hyperparameters(flags)
        self._restore_rng(folder)
        trainer.restore_ema()
        trainer.metrics.truncate_after(trainer.state.global_step)
        self.last_saved_step = trainer.state.global_step
        acc.print(f"resumed from {folder}: step {trainer.state.global_step}, epoch {trainer.state.epoch}, "
                  f"{trainer.state.tokens_seen:,} tokens seen, best val loss {trainer.state.best_val_loss}")
        return folder

    def _load_hook(self, models, input_dir) -> None:
        """Accelerate pre-load hook: refuse unsafe files; load weights into the unwrapped model."""
        for path in Path(input_dir).rglob("*"):
            if path.suffix in PICKLED_SUFFIXES and path.is_file():
                check_pickle_is_data(path)
            elif path.name == ".metadata" and path.is_file():  # FSDP sharded (DCP) checkpoints
                check_dcp_metadata_is_data(path)
        for i, model in enumerate(models):
            # Weights are saved without wrapper prefixes; the unwrapped module shares the parameters.
            models[i] = self.accelerator.unwrap_model(model)

    def _check_compatible(self, folder: Path) -> None:
        saved = read_json(folder / MODEL_CONFIG)
        current = self.accelerator.unwrap_model(self.trainer.model).config.to_dict()
        diffs = architecture_differences(saved, current)
        if diffs:
            raise CheckpointError(
                f"{folder}: the model architecture differs from this run ({'; '.join(diffs)}). "
                f"To start from its weights anyway, pass --init_from {folder} (weights only, non-strict) "
                "instead of --resume_from_checkpoint")

    def _print_config_changes(self, folder: Path) -> None:
        saved = read_json(folder / RUN_CONFIG)
        changes = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in self.trainer.run_config.items()
                   if k not in QUIET_KEYS and saved.get(k) != v]
        if changes:
            self.accelerator.print("resuming with changed settings (the new values apply):\n  " + "\n  ".join(changes))

    def _snapshot_flag_hyperparameters(self) -> dict:
        snap = {}
        for name, opt in self.trainer.optimizers.optimizers.items():
            snap[name] = [{k: g[k] for k in (*FLAG_HYPERPARAMETERS, "initial_lr") if k in g} for g in opt.param_groups]
        return snap

    def _apply_flag_hyperparameters(self, snap: dict) -> None:
        """Current flags win over the checkpoint's optimizer hyperparameters; the LR follows the schedule
        from the current base LR (equal to the saved one unless the user changed it)."""
        for name, opt in self.trainer.optimizers.optimizers.items():
            scheduler = self.trainer.schedulers.schedulers[name]
            for i, (group, saved) in enumerate(zip(opt.param_groups, snap[name])):
                group.update(saved)
                scheduler.base_lrs[i] = saved["initial_lr"]
                group["lr"] = saved["initial_lr"] * scheduler.lr_lambdas[i](scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in opt.param_groups]

    def _restore_rng(self, folder: Path) -> None:
        acc = self.accelerator
        path = folder / rng_file(acc.process_index)
        if not path.exists():
            seed = self.trainer.args.seed + 1000 * acc.process_index + self.trainer.state.global_step
            torch.manual_seed(seed)
            warnings.warn(f"rank {acc.process_index}: {folder} has no saved RNG for this rank (saved with a smaller "
                          f"world size); its generators are seeded with {seed} instead", stacklevel=2)
            return
        from .io import safe_torch_load

        for note in rng.restore(safe_torch_load(path)):
            warnings.warn(f"rank {acc.process_index}: {note}", stacklevel=2)
