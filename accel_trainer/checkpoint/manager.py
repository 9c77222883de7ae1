"""The Checkpointer: saves and restores a run's whole state through Accelerate's save_state/load_state.

Save protocol (a process killed at any instant leaves ``latest`` at a complete checkpoint):
  1. all ranks write into ``checkpoints/.tmp-step-N/``: ``accelerator.save_state`` (RNG, scaler, and
     for FSDP its sharded model/optimizer) plus, through our pre-save hook, the named state: trainer
     counters, schedulers, configs and every rank's RNG;
  2. the big tensors of non-sharded runs (model weights from Accelerate's own ``get_state_dict``, and
     the optimizer state) are written by :mod:`tensor_files` at disk speed and hashed on the way,
     either now (sync) or from reused staging buffers by a background thread (``--async_save``);
  3. the main process fsyncs everything, writes ``manifest.json`` (size + xxh3-128 + role per file),
     then ``COMPLETE``, renames the folder to ``step-N``, fsyncs ``checkpoints/``, and only then moves
     ``latest`` (and ``best``) by atomic rename; then applies retention.
"""

from __future__ import annotations

import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import DistributedType, broadcast_object_list, gather_object

from . import optimizer_files, rng
from .io import (CheckpointError, check_dcp_metadata_is_data, check_pickle_is_data, fsync_dir, fsync_file,
                 fsync_tree, read_json, safe_torch_load, write_json)
from .layout import (TMP_PREFIX, apply_retention, checkpoints_dir, ensure_dir, remove_stale_temporaries,
                     resolve, step_dir_name, write_pointer)
from .manifest import write_complete_marker, write_manifest
from .tensor_files import SafetensorsFile
from .weights import load_state_into, normalize_state_dict, read_weights

TRAINER_STATE = "trainer_state.json"
SCHEDULERS = "schedulers.json"
RUN_CONFIG = "run_config.json"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pkl", ".pth")
# Sharded or engine-managed states stay entirely with Accelerate (it knows how to gather/shard them).
ACCELERATE_OWNS_TENSORS = {DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM,
                           DistributedType.XLA}
# Hyperparameters that follow the current flags on resume (the checkpoint supplies state, not these).
FLAG_HYPERPARAMETERS = ("weight_decay", "momentum", "nesterov", "ns_steps", "betas", "eps")
# Run-config keys that may differ on resume without comment (they say where/how, not what).
QUIET_KEYS = {"resume_from_checkpoint", "output_dir", "disable_tqdm", "report_to", "run_name", "async_save"}


def write_file(file: SafetensorsFile, path: Path) -> None:
    """Write without fsync (the caller flushes the whole folder at once)."""
    file.write(path, fsync=False)


def not_saved(step: int, err: OSError, where: Path) -> str:
    """One line for a save that an OS error stopped (ENOSPC, permissions, ...)."""
    return f"checkpoint at step {step} not saved: {err.strerror or err} ({err.filename or where})"


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def architecture_differences(saved: dict, current: dict) -> list[str]:
    from ..models.configuration_moe import ARCHITECTURE_KEYS

    return [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
            for k in ARCHITECTURE_KEYS if saved.get(k) != current.get(k)]


class StagingBuffers:
    """CPU copies of the state for an async save, reused from save to save.

    A fresh ``clone`` runs at ~2.5 GB/s here because of page faults; copying into buffers that were
    already touched runs at memory speed. Pinned when the source is on a GPU (faster DMA).
    """

    def __init__(self):
        self.buffers: dict[tuple[str, str], torch.Tensor] = {}

    def stage(self, file_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copies of ``tensors`` (one file's worth) in this file's buffers."""
        staged = {}
        for name, src in tensors.items():
            src = src.detach()
            buf = self.buffers.get((file_name, name))
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=src.is_cuda)
                self.buffers[(file_name, name)] = buf
            buf.copy_(src, non_blocking=src.is_cuda)
            staged[name] = buf
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return staged


class Checkpointer:
    """Owns ``<output_dir>/checkpoints`` for one trainer.

    Args:
        trainer: the :class:`~accel_trainer.trainer.Trainer` whose state is saved (model, optimizer
            container, schedulers, counters, run config).
        output_dir: the run's output dir.
        save_total_limit: keep this many newest checkpoints (plus latest and best); None keeps all.
        keep_every_n_steps: also keep every checkpoint whose step is a multiple of this.
        async_save: write the big tensor files in a background thread (non-sharded runs).
        save_strict: a save that does not fit or fails stops the run; otherwise it is skipped with a
            loud warning and training goes on (the previous checkpoints stay as they are).
    """

    # Headroom on top of the tensor bytes: JSON, RNG files, safetensors headers, filesystem blocks.
    SIZE_SLACK_BYTES = 16 << 20

    def __init__(self, trainer, output_dir: str | Path, save_total_limit: int | None = None,
                 keep_every_n_steps: int | None = None, async_save: bool = False, save_strict: bool = False):
        self.trainer = trainer
        self.accelerator = trainer.accelerator
        self.root = checkpoints_dir(output_dir)
        self.save_total_limit = save_total_limit
        self.keep_every_n_steps = keep_every_n_steps
        self.last_saved_step: int | None = None
        self.owns_tensors = getattr(self.accelerator, "distributed_type", None) not in ACCELERATE_OWNS_TENSORS
        self.async_save = async_save and self.owns_tensors
        self.save_strict = save_strict
        self._staging = StagingBuffers()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if self.async_save else None
        self._pending: Future | None = None
        self._model_tensors: dict[str, torch.Tensor] | None = None
        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)

    # ------------------------------------------------------------------------------------- saving
    def save(self, reasons: list[str], wait: bool = False) -> Path | None:
        """Save the whole state at the current step (a collective call: every rank must call it).

        With ``async_save`` this returns once the state is staged in memory; the files are written in
        the background. At most one save is in flight: this first waits for the previous one.

        Returns:
            The checkpoint folder, or None when the save was skipped (no room, or it failed and
            ``save_strict`` is off); existing checkpoints are never touched by a skipped save.
        """
        acc, trainer = self.accelerator, self.trainer
        self.wait()
        step = trainer.state.global_step
        trainer.sync_state()
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        problem = None
        if acc.is_main_process:
            try:
                ensure_dir(self.root)
                remove_stale_temporaries(self.root)
                problem = self._no_room(step)
                if problem is None:
                    tmp.mkdir()
            except OSError as err:
                problem = not_saved(step, err, self.root)
        problem = self._agree([problem])
        if problem:
            return self._skipped(problem, tmp)
        problems = [None]
        big = {}
        try:
            self._model_tensors = None
            with self._accelerate_skips_optimizer():
                acc.save_state(str(tmp), safe_serialization=True)
            if self.owns_tensors and acc.is_main_process:
                opt_tensors, description = optimizer_files.split_state(trainer.optimizers.state_dict())
                optimizer_files.write_description(tmp, description)
                big = {MODEL_WEIGHTS: self._model_tensors, optimizer_files.TENSORS: opt_tensors}
                if self.async_save and not wait:
                    big = {name: self._staging.stage(name, t) for name, t in big.items()}
            # Each rank makes its own files durable (on node-local disks this is the only fsync they get).
            for name in (rng_file(acc.process_index), f"random_states_{acc.process_index}.pkl"):
                if (tmp / name).exists():
                    fsync_file(tmp / name)
        except OSError as err:
            problems = [not_saved(step, err, tmp)]
        finally:
            self._model_tensors = None
        problem = self._agree(problems)
        if problem is None and acc.is_main_process:
            if self.async_save and not wait:
                self._pending = self._executor.submit(self._finish, tmp, final, step, reasons, big)
            else:
                try:
                    self._finish(tmp, final, step, reasons, big)
                except OSError as err:
                    problem = not_saved(step, err, tmp)
        if not self.async_save or wait:
            problem = self._agree([problem])
        if problem:
            return self._skipped(problem, tmp)
        self.last_saved_step = step
        acc.print(f"checkpoint: {'staged' if self._pending else 'saved'} {final} ({', '.join(reasons)})")
        return final

    def estimate_bytes(self) -> int:
        """Bytes the next checkpoint will take: every model and optimizer tensor, plus headroom."""
        model = self.accelerator.unwrap_model(self.trainer.model)
        tensors = list(model.state_dict().values())
        tensors += [v for state in self.trainer.optimizers.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors) + self.SIZE_SLACK_BYTES

    def _no_room(self, step: int) -> str | None:
        needed, free = self.estimate_bytes(), shutil.disk_usage(self.root).free
        if needed <= free:
            return None
        return (f"checkpoint at step {step} not saved: it needs about {needed / 2**30:.2f} GiB but "
                f"{self.root} has {free / 2**30:.2f} GiB free (short by {(needed - free) / 2**30:.2f} GiB); "
                "free space or lower --save_total_limit")

    def _agree(self, problems: list[str | None]) -> str | None:
        """Every rank learns the first problem any rank had (a collective call)."""
        if self.accelerator.num_processes > 1:
            problems = gather_object(problems)
        return next((p for p in problems if p), None)

    def _skipped(self, problem: str, tmp: Path) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space; checkpoints are untouched
        if self.save_strict:
            raise CheckpointError(problem + " (--save_strict)")
        warnings.warn(f"{problem}; training continues, the previous checkpoints are intact", stacklevel=3)
        self.accelerator.print(f"WARNING: {problem}; training continues, the previous checkpoints are intact")
        return None

    def _finish(self, tmp: Path, final: Path, step: int, reasons: list[str], big: dict) -> None:
        """Write the big files, then manifest, marker, rename and pointers (main process; maybe a thread)."""
        files = {name: SafetensorsFile(tensors) for name, tensors in big.items()}
        for name, file in files.items():
            write_file(file, tmp / name)
        # One flush for the whole checkpoint (every file, then the folder) while a thread hashes the
        # same bytes from memory: the checksums cost no time of their own.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum") as hasher:
            digests = hasher.submit(lambda: {name: file.digest() for name, file in files.items()})
            fsync_tree(tmp)
            digests = digests.result()
        manifest = write_manifest(tmp, step=step, reasons=reasons, accelerator=self.accelerator, known=digests)
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

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; raise its error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as err:
                self.last_saved_step = None  # that step is not on disk; an emergency save must redo it
                problem = (f"background checkpoint write failed ({type(err).__name__}: {err}); "
                           "'latest' still points to the previous complete checkpoint")
                if self.save_strict or not isinstance(err, OSError):
                    raise CheckpointError(problem) from err
                self._skipped(problem, self.root / f"{TMP_PREFIX}none")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)

    @contextmanager
    def _accelerate_skips_optimizer(self):
        """Hide the optimizer from save_state/load_state when we write its state ourselves."""
        acc = self.accelerator
        if not self.owns_tensors:
            yield
            return
        hidden, acc._optimizers = acc._optimizers, []
        try:
            yield
        finally:
            acc._optimizers = hidden

    def _save_hook(self, models, weights, output_dir) -> None:
        """Accelerate pre-save hook: take over the weights file and write our named state files."""
        out, acc, trainer = Path(output_dir), self.accelerator, self.trainer
        if weights and self.owns_tensors:
            # Names without DDP/compile prefixes so any world size loads them; we write the file
            # (streamed + hashed), so Accelerate is told there is nothing left to save.
            self._model_tensors = normalize_state_dict(weights[0]) if acc.is_main_process else None
            weights.clear()
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
            with self._accelerate_skips_optimizer():
                acc.load_state(str(folder))
            if self.owns_tensors:
                self._load_optimizer(folder)
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

    def _load_optimizer(self, folder: Path) -> None:
        try:
            device = self.accelerator.device
            # Straight onto the parameters' device; safetensors spells the CPU "cpu", never "cpu:0".
            device = "cpu" if device.type == "cpu" else str(device)
            self.trainer.optimizers.load_state_dict(optimizer_files.read_state(folder, device))
        except ValueError as err:  # OptimizersContainer refuses mismatched groups by name
            raise CheckpointError(f"{folder / optimizer_files.TENSORS}: {err}. Pass --reset_optimizer to keep "
                                  "the weights and start the optimizer fresh") from None

    def _load_hook(self, models, input_dir) -> None:
        """Accelerate pre-load hook: refuse unsafe files; load non-sharded weights in place ourselves."""
        for path in Path(input_dir).rglob("*"):
            if path.suffix in PICKLED_SUFFIXES and path.is_file():
                check_pickle_is_data(path)
            elif path.name == ".metadata" and path.is_file():  # FSDP sharded (DCP) checkpoints
                check_dcp_metadata_is_data(path)
        if self.owns_tensors and models:
            self._load_weights_in_place(Path(input_dir) / MODEL_WEIGHTS, self.accelerator.unwrap_model(models[0]))
            models.clear()  # Accelerate's documented way to say "already loaded"

    @staticmethod
    def _load_weights_in_place(path: Path, model: torch.nn.Module) -> None:
        """Copy tensor by tensor from the (memory-mapped) file into the parameters: peak memory is the
        model plus one tensor, not a second copy of the weights."""
        from safetensors import safe_open

        own = model.state_dict()
        with safe_open(path, framework="pt", device="cpu") as f:
            saved = set(f.keys())
            if saved != set(own):
                missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
                raise CheckpointError(f"{path}: weights differ from the model (missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}); use --init_from for non-strict loading")
            with torch.no_grad():
                for name, target in own.items():
                    target.copy_(f.get_tensor(name))

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
        for note in rng.restore(safe_torch_load(path)):
            warnings.warn(f"rank {acc.process_index}: {note}", stacklevel=2)
