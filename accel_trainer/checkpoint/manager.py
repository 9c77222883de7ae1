"""The Checkpointer: crash-proof checkpoints for any Accelerate training loop.

    ckpt = Checkpointer(accelerator, "runs/x", model=model, optimizer=optimizer, scheduler=scheduler,
                        dataloader=train_loader, extra={"loop": loop_state}, save_total_limit=3)
    train_loader = ckpt.dataloader            # the same batches; continues mid-epoch after a resume
    start_step = ckpt.resume("latest")        # 0 when there is nothing to resume
    ...
    ckpt.save(step, metrics={"val_loss": v})  # collective: every process calls it
    ckpt.close()

Everything is saved by name (torchtitan's ``Stateful`` idea: objects with ``state_dict()`` and
``load_state_dict()``). Who writes the model and optimizer tensors is a strategy chosen once
(:mod:`strategies`): our streamed, hashed safetensors for a whole model, DCP shards under FSDP2, or
the engine's own ``save_state`` for FSDP1/DeepSpeed. Accelerate writes every rank's RNG and the grad
scaler through its public ``save_accelerator_state``.

A save is three phases, each ending in one agreement of all ranks:
  1. reserve: the main process checks the free space and makes ``checkpoints/.tmp-step-N/``;
  2. write: every rank writes its share (RNG; under FSDP its shards), the main process the named
     state, and the big tensors now, or from staging buffers in a background thread (``async_save``);
  3. commit (main process): fsync, ``manifest.json``, ``COMPLETE``, rename to ``step-N``, fsync the
     parent, then the ``latest``/``best`` pointers (atomic rename), then retention.
A process killed at any instant leaves the newest complete checkpoint loadable; a save that fails
is skipped (or raises with ``save_strict``) and never touches the checkpoints already there.
"""

from __future__ import annotations

import shutil
import signal
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from accelerate.utils import broadcast_object_list, gather_object

from . import rng
from .dataloader import ResumableLoader, has_own_position
from .emergency import StopRequest
from .format import (DATALOADER, FORMAT_VERSION, MODEL_CONFIG, NAME_RE, RESERVED_NAMES, RUN_CONFIG, SCHEDULERS,
                     TMP_PREFIX, rng_file, step_dir_name)
from ..errors import DamagedFile
from .io import CheckpointError, fsync_dir, fsync_file, read_state, write_json, write_state
from .lock import lock_run_dir
from .layout import (apply_retention, checkpoints_dir, ensure_dir, next_sequence, remove_stale_temporaries, resolve,
                     write_pointer)
from .manifest import EXCEPT_OPTIMIZER, for_resume, read_manifest, write_complete_marker, write_manifest
from .rewrite import finish_interrupted
from .thinning import apply_thinning, is_weights_only
from .remote import RemoteTier, Uploader, redact, remote_tier, resolve_with_remote
from .sharded import Channel
from .strategies import SaveParts, choose_strategy, refuse_code_in

PARTS = ("model", "optimizer", "scheduler", "dataloader")
_UNRESOLVED = object()


@dataclass
class CheckpointConfig:
    """How a :class:`Checkpointer` saves: retention, ``best``, async, strictness, signals, the lock,
    and the object-storage tier. Values are checked when it is made.

    Args:
        save_total_limit: keep this many most recent checkpoints (plus ``latest`` and ``best``); None keeps all.
        keep_every_n_steps: also keep every checkpoint whose step is a multiple of this.
        best_metric: the ``save(metrics=...)`` key that decides ``best``; ``greater_is_better`` its direction.
        async_save: write the big tensor files in a background thread; for a sharded (FSDP2) model
            each rank stages its shards and writes them in the background (see :mod:`sharded`).
        save_strict: a save that does not fit or fails raises :class:`CheckpointError`; by default it
            is skipped with a warning and training goes on (the checkpoints already there stay intact).
        handle_signals: turn SIGTERM/SIGINT/SIGUSR1 into :meth:`Checkpointer.stop_requested`.
        lock: hold ``<output_dir>/.lock`` until :meth:`Checkpointer.close`, so that a second run on the
            same output dir refuses to start instead of destroying this one's checkpoints.
        upload_to: an fsspec URL (``s3://bucket/prefix``): every complete checkpoint is also uploaded
            there in the background (see :mod:`remote`), and resume looks there too.
        storage_options: for that filesystem (s3fs: ``{"endpoint_url": ...}``); never saved or printed.
        compression: ``"zstd"``: store the model's and optimizers' tensors compressed losslessly
            (``*.ztensors``, bytes grouped per element; see :mod:`.ztensors`); None stores safetensors.
            Sharded (FSDP2) checkpoints use DCP's own zstd stream extension.
        compression_level: zstd's level (1 fastest; 3 its default).
        full_state_total_limit: keep the whole state (optimizers, data position, RNG) only in the newest
            N checkpoints and ``best``; older kept ones become weights-only (see :mod:`.thinning`).
        store_frozen: False: parameters that need no gradient are not written at all (they come from
            elsewhere, e.g. the frozen base of LoRA adapters, whose identity the caller records and
            checks); a resume loads the trainable ones and leaves the frozen ones as built. True
            (default): they are stored once and linked while unchanged.
    """

    save_total_limit: int | None = None
    keep_every_n_steps: int | None = None
    best_metric: str = "val_loss"
    greater_is_better: bool = False
    async_save: bool = False
    save_strict: bool = False
    handle_signals: bool = False
    lock: bool = True
    upload_to: str | None = None
    storage_options: dict | None = None
    compression: str | None = None
    compression_level: int = 3
    full_state_total_limit: int | None = None
    store_frozen: bool = True

    def __post_init__(self):
        if self.compression not in (None, "zstd"):
            raise CheckpointError(f"CheckpointConfig(compression={self.compression!r}): use 'zstd' or None")
        if not isinstance(self.compression_level, int) or not 1 <= self.compression_level <= 22:
            raise CheckpointError(f"CheckpointConfig(compression_level={self.compression_level!r}): zstd levels are "
                                  "1..22")
        for name in ("save_total_limit", "keep_every_n_steps", "full_state_total_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise CheckpointError(f"CheckpointConfig({name}={value!r}): must be an int >= 1, or None")
        if self.storage_options and not self.upload_to:
            raise CheckpointError("CheckpointConfig(storage_options=...): only used with upload_to; give that too")

    def __repr__(self) -> str:  # never print credentials
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["storage_options"] = redact(values["storage_options"])
        return f"CheckpointConfig({', '.join(f'{k}={v!r}' for k, v in values.items())})"


def not_saved(step: int, err: BaseException, where: Path) -> str:
    """One line for a save that failed while writing (ENOSPC, permissions, a writer's RuntimeError...)."""
    if isinstance(err, OSError):
        return f"checkpoint at step {step} not saved: {err.strerror or err} ({err.filename or where})"
    return f"checkpoint at step {step} not saved: {type(err).__name__}: {err} (writing {where})"


def _named(value, default_name: str, what: str) -> dict:
    if value is None:
        return {}
    named = dict(value) if isinstance(value, dict) else {default_name: value}
    for name, obj in named.items():
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"Checkpointer({what}=...): {name!r} is a {type(obj).__name__}, which has no "
                            "state_dict()/load_state_dict()")
    return named


class Checkpointer:
    """Saves and restores the whole state of a training loop under ``<output_dir>/checkpoints``.

    Args:
        accelerator: the run's ``Accelerator``.
        output_dir: the run's folder; checkpoints go to ``<output_dir>/checkpoints/step-N``.
        model: the prepared model.
        optimizer: one optimizer, or a dict name -> optimizer (prepared or not).
        scheduler: one LR scheduler, or a dict name -> scheduler (any object with ``state_dict``).
        dataloader: the prepared training loader; iterate :attr:`dataloader` (a
            :class:`ResumableLoader` around it) so that its position is saved and restored. A loader
            that already has ``state_dict()`` (e.g. torchdata's ``StatefulDataLoader``) is used as is.
        extra: name -> anything with ``state_dict()``/``load_state_dict()`` (a loop's counters, an
            EMA, ...); JSON when the state is plain JSON, else ``torch.save`` read back weights-only.
        config: the run's configuration (a JSON-able dict), saved as ``run_config.json``.
        tokenizer: saved into every checkpoint with its ``save_pretrained`` (so the folder loads with
            ``AutoTokenizer`` and exports carry it).
        settings: how to save (:class:`CheckpointConfig`); or give its fields as keywords
            (``save_total_limit=3``), which is the same.
        before_resume: a policy called with the resolved checkpoint folder before anything is loaded
            (e.g. refuse another architecture); it raises :class:`CheckpointError` to refuse.
        model_config: the model's ``config.json`` as a dict, for a model without a transformers config
            (by default ``model.config.to_json_file`` writes it), so the folder rebuilds the model.
    """

    # Headroom on top of the tensor bytes: JSON, RNG files, safetensors headers, filesystem blocks.
    SIZE_SLACK_BYTES = 16 << 20

    def __init__(self, accelerator, output_dir: str | Path, *, model, optimizer=None, scheduler=None,
                 dataloader=None, extra: dict | None = None, config: dict | None = None, tokenizer=None,
                 settings: CheckpointConfig | None = None, before_resume: Callable[[Path], None] | None = None,
                 model_config: dict | None = None, **setting_overrides):
        if settings is not None and setting_overrides:
            raise TypeError("Checkpointer(settings=..., ...): give a CheckpointConfig or its fields as keywords, not "
                            "both")
        known = {f.name for f in fields(CheckpointConfig)}
        unknown = sorted(set(setting_overrides) - known)
        if unknown:
            raise TypeError(f"Checkpointer(): unexpected keyword(s) {unknown}; CheckpointConfig has {sorted(known)}")
        self.settings = settings if settings is not None else CheckpointConfig(**setting_overrides)
        cfg = self.settings
        self.accelerator = accelerator
        self.root = checkpoints_dir(output_dir)
        self.model = model
        self.optimizers = _named(optimizer, "optimizer", "optimizer")
        self.schedulers = _named(scheduler, "scheduler", "scheduler")
        self.extra = _named(extra, "extra", "extra")
        for name in self.extra:
            if not NAME_RE.match(name) or name in RESERVED_NAMES:
                raise ValueError(f"Checkpointer(extra=...): {name!r} cannot name a state file (use letters, digits "
                                 f"and _, not one of {sorted(RESERVED_NAMES)})")
        own_position = dataloader is None or has_own_position(dataloader)
        self.dataloader = dataloader if own_position else ResumableLoader(dataloader)
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.best: dict | None = None  # {"metric", "value", "step"} of the best checkpoint saved
        self.last_saved_step: int | None = None
        self.before_resume = before_resume
        # Who writes the model and optimizer tensors, chosen once (see :mod:`strategies`).
        self.strategy = choose_strategy(SaveParts(accelerator, model, self.optimizers, self.schedulers, dataloader,
                                                  commit=self._commit, upload=self._submit_upload,
                                                  compression=cfg.compression, compression_level=cfg.compression_level,
                                                  store_frozen=cfg.store_frozen))
        self.async_save = cfg.async_save and self.strategy.background
        self._sequence: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if self.async_save else None
        self._pending: tuple[Future, Path, dict | None] | None = None
        self._lock = lock_run_dir(accelerator, output_dir) if cfg.lock else None  # after every check that may raise
        self.remote = remote_tier(cfg.upload_to, cfg.storage_options) if cfg.upload_to else None
        self._uploader = None
        if self.remote is not None:
            problem = None
            if accelerator.is_main_process:
                try:
                    self.remote.check()
                except CheckpointError as err:
                    problem = f"--checkpoint_upload_to: {err}"
            problem = self._agree(problem)
            if problem and cfg.save_strict:
                raise CheckpointError(f"{problem} (--save_strict)")
            if problem:
                accelerator.print(f"WARNING: {problem}; checkpoints stay local until it works (each save tries again)")
        if self.remote is not None and (accelerator.is_main_process or self.strategy.every_rank_commits):
            # Sharded: every rank uploads the shards it wrote, in step with the others (a channel of
            # their own); otherwise the main process uploads everything.
            self._uploader = Uploader(self.remote, cfg.save_total_limit, cfg.keep_every_n_steps,
                                      report=accelerator.print,
                                      channel=Channel() if self.strategy.every_rank_commits else None,
                                      files_of=self.strategy.files_to_upload)
        self._stop = StopRequest(accelerator.num_processes) if cfg.handle_signals else None
        if self._stop is not None:
            self._stop.install()

    @property
    def save_strict(self) -> bool:
        return self.settings.save_strict

    @property
    def sharded(self) -> bool:
        """Whether the model's tensors are written as per-rank shards (FSDP2)."""
        return self.strategy.every_rank_commits

    # ------------------------------------------------------------------------------------- saving
    def improves_best(self, metrics: dict | None) -> bool:
        """Whether ``metrics`` beat the best checkpoint's (same answer on every rank for equal metrics)."""
        value = (metrics or {}).get(self.settings.best_metric)
        if value is None or value != value:  # absent or NaN
            return False
        if self.best is None:
            return True
        return value > self.best["value"] if self.settings.greater_is_better else value < self.best["value"]

    def save(self, step: int, metrics: dict | None = None, reason: str | list[str] = "periodic",
             wait: bool = False) -> Path | None:
        """Save the whole state as ``step-<step>`` (a collective call: every process must call it).

        Args:
            step: the loop's step; :meth:`resume` returns it.
            metrics: stored with the checkpoint; when ``metrics[best_metric]`` beats the best so far,
                this checkpoint becomes ``best``.
            reason: why it is saved ("periodic", "final", "emergency", ...), recorded in the manifest.
            wait: with ``async_save``, write now instead of in the background.

        Returns:
            The checkpoint folder, or None when the save was skipped (no room, or it failed and
            ``save_strict`` is off); existing checkpoints are never touched by a skipped save.
        """
        acc = self.accelerator
        self.wait()
        self._raise_if_upload_failed()
        reasons = [reason] if isinstance(reason, str) else list(reason)
        best = None
        if self.improves_best(metrics):
            reasons.append("best")
            best = {"metric": self.settings.best_metric, "value": metrics[self.settings.best_metric], "step": step}
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        # 1. reserve
        problem = self._agree(self._reserve(step, tmp) if acc.is_main_process else None)
        if problem:
            return self._skipped(problem, tmp)
        # 2. write
        big, problem = {}, None
        try:
            big = self._write(tmp, step, stage=self.async_save and not wait)
        except Exception as err:  # any writer failure (OSError, torch's RuntimeError on ENOSPC, ...)
            problem = not_saved(step, err, tmp)
        problem = self._agree(problem)
        if problem:
            return self._skipped(problem, tmp)
        # 3. commit
        record = {"step": step, "reasons": reasons, "metrics": dict(metrics or {}),
                  "best": best or self.best, "sequence": self._next_sequence()}
        background = self.async_save and not wait
        notes = []
        finish = self.strategy.finish
        if self.strategy.every_rank_commits or acc.is_main_process:
            if background:
                self._pending = (self._executor.submit(finish, tmp, final, record, big), tmp, self.best)
            else:
                try:
                    notes = finish(tmp, final, record, big)
                except Exception as err:
                    problem = not_saved(step, err, tmp)
        if not background:
            problem = self._agree(problem)
            if problem:
                return self._skipped(problem, tmp)
        self._committed(record)
        acc.print(f"checkpoint: {'staged' if background else 'saved'} {final} ({', '.join(reasons)})")
        self._report_after_commit(final, notes)
        return final

    def _reserve(self, step: int, tmp: Path) -> str | None:
        try:
            ensure_dir(self.root)
            finish_interrupted(self.root)  # a rewrite (thinning, upgrade) a kill stopped between its renames
            remove_stale_temporaries(self.root)
            problem = self._no_room(step)
            if problem is None:
                tmp.mkdir()
            return problem
        except (OSError, CheckpointError) as err:
            return not_saved(step, err, self.root) if isinstance(err, OSError) else str(err)

    def _write(self, tmp: Path, step: int, stage: bool) -> dict:
        """Every rank: Accelerate's share (RNG, scaler; an engine's shards) and, on the main process,
        the named state. Returns the big tensor files still to write (staged copies when ``stage``)."""
        acc = self.accelerator
        self.strategy.save_engine_state(tmp, step)
        if acc.is_main_process:
            self._write_named_state(tmp)
        big = self.strategy.write_tensors(tmp, stage)
        # Each rank makes its own file durable (on node-local disks this is the only fsync it gets).
        own = tmp / rng_file(acc.process_index)
        if own.exists():
            fsync_file(own)
        return big

    def _write_named_state(self, tmp: Path) -> None:
        if self.schedulers:
            write_state(tmp, SCHEDULERS, {n: s.state_dict() for n, s in self.schedulers.items()})
        if self.dataloader is not None:
            write_state(tmp, DATALOADER, self.dataloader.state_dict())
        for name, obj in self.extra.items():
            write_state(tmp, name, obj.state_dict())
        if self.config is not None:
            write_json(tmp / RUN_CONFIG, self.config)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        model_config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        if self.model_config is not None:
            write_json(tmp / MODEL_CONFIG, self.model_config)
        elif hasattr(model_config, "to_json_file"):  # transformers models: rebuildable from the folder
            model_config.to_json_file(tmp / MODEL_CONFIG)

    def _commit(self, tmp: Path, final: Path, record: dict, digests: dict, upload: bool = True) -> list[str]:
        """Main process, every file durable in ``tmp``: manifest, marker, rename, pointers, retention.
        ``upload`` False: the caller submits the upload itself (every rank of a sharded save)."""
        manifest = write_manifest(tmp, accelerator=self.accelerator, known=digests, **record)
        write_complete_marker(tmp, manifest)
        fsync_dir(tmp)
        replaced = self._rename_into_place(tmp, final)
        return self._after_commit(final, record, replaced, upload)

    def _submit_upload(self, final: Path, record: dict) -> None:
        if self._uploader is not None:
            self._uploader.submit(final, ["latest", "best"] if "best" in record["reasons"] else ["latest"])

    def _rename_into_place(self, tmp: Path, final: Path) -> Path | None:
        """The commit point: ``tmp`` becomes ``final``. The same step saved again (an emergency save
        after a periodic one) swaps the folders; if the swap fails the old folder is put back."""
        replaced = None
        if final.exists():
            replaced = self.root / f"{TMP_PREFIX}replaced-{final.name}"
            final.rename(replaced)
        try:
            tmp.rename(final)
        except BaseException:
            if replaced is not None:
                replaced.rename(final)
            raise
        fsync_dir(self.root)
        return replaced

    def _after_commit(self, final: Path, record: dict, replaced: Path | None, upload: bool = True) -> list[str]:
        """Pointers and retention. Each is tried even if another failed; failures are returned, not
        raised: the checkpoint is saved, and resolution finds it without the pointers."""
        problems = []
        pointers = ("latest", "best") if "best" in record["reasons"] else ("latest",)
        for pointer in pointers:
            try:
                write_pointer(self.root, pointer, final)
            except OSError as err:
                problems.append(f"moving '{pointer}' to {final.name} failed ({err.strerror or err})")
        if upload:
            self._submit_upload(final, record)
        try:
            if replaced is not None:
                shutil.rmtree(replaced)
            uploading = self._uploader.pending() if self._uploader is not None else set()
            apply_retention(self.root, keep_last=self.settings.save_total_limit,
                            keep_every_n_steps=self.settings.keep_every_n_steps, keep=uploading)
            apply_thinning(self.root, self.settings.full_state_total_limit, keep=uploading | {final.name})
        except OSError as err:
            problems.append(f"removing old checkpoints failed ({err.strerror or err}; the next save retries)")
        return problems

    def _report_after_commit(self, final: Path, problems: list[str]) -> None:
        if problems:
            message = (f"checkpoint {final} is saved, but {'; '.join(problems)}. --resume_from_checkpoint latest "
                       "still finds it: it is the most recent valid checkpoint")
            warnings.warn(message, stacklevel=3)
            self.accelerator.print(f"WARNING: {message}")

    def _committed(self, record: dict) -> None:
        self.last_saved_step = record["step"]
        self.best = record["best"]
        self._sequence = record["sequence"]

    def _next_sequence(self) -> int:
        if self._sequence is None:  # the first save of this process: continue after what is on disk
            answer = [next_sequence(self.root) if self.accelerator.is_main_process else 0]
            if self.accelerator.num_processes > 1:
                broadcast_object_list(answer, from_process=0)
            self._sequence = answer[0] - 1
        return self._sequence + 1

    def estimate_bytes(self) -> int:
        """Bytes the next checkpoint will take: every model and optimizer tensor, plus headroom."""
        model = self.accelerator.unwrap_model(self.model)
        tensors = list(model.state_dict().values())
        tensors += [v for opt in self.optimizers.values() for state in opt.state.values()
                    for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors) + self.SIZE_SLACK_BYTES

    def _no_room(self, step: int) -> str | None:
        needed, free = self.estimate_bytes(), shutil.disk_usage(self.root).free
        if needed <= free:
            return None
        return (f"checkpoint at step {step} not saved: it needs about {needed / 2**30:.2f} GiB but "
                f"{self.root} has {free / 2**30:.2f} GiB free (short by {(needed - free) / 2**30:.2f} GiB); "
                "free space or lower --save_total_limit")

    def _agree(self, problem: str | None) -> str | None:
        """Every rank learns the first problem any rank had (a collective call)."""
        problems = [problem]
        if self.accelerator.num_processes > 1:
            problems = gather_object(problems)
        return next((p for p in problems if p), None)

    def _skipped(self, problem: str, tmp: Path) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space; checkpoints are untouched
        if self.save_strict:
            raise CheckpointError(problem + " (--save_strict)")
        message = f"{problem}; training continues, the previous checkpoints are intact"
        warnings.warn(message, stacklevel=3)
        self.accelerator.print(f"WARNING: {message}")
        return None

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk; report its failure like a sync save's."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        future, tmp, best_before = pending
        try:
            notes = future.result()
        except Exception as err:
            self.last_saved_step = None  # that step is not on disk; an emergency save must redo it
            self.best = best_before
            self._skipped(f"background checkpoint write failed ({type(err).__name__}: {err}); 'latest' still "
                          "points to the previous complete checkpoint", tmp)
            return
        self._report_after_commit(tmp.parent / tmp.name[len(TMP_PREFIX):], notes)

    def _raise_if_upload_failed(self) -> None:
        """With ``save_strict``, a failed upload stops the run on every rank (a collective call)."""
        if self.save_strict and self.remote is not None:
            failed = self._agree(self._uploader.failures[0] if self._uploader and self._uploader.failures else None)
            if failed:
                raise CheckpointError(failed + " (--save_strict)")

    @property
    def remote_behind(self) -> str | None:
        """After :meth:`close`: why the object store does not hold the newest checkpoint (None when it
        does, or there is no object-storage tier)."""
        return self._uploader.behind if self._uploader is not None and self.accelerator.is_main_process else None

    def wait_for_uploads(self) -> None:
        """Block until every checkpoint saved so far is uploaded (or its upload failed)."""
        if self._uploader is not None:
            self._uploader.wait()

    def close(self) -> None:
        """Wait for the save in flight and the uploads, then release the signal handlers (unless a stop
        signal came: then they stay, so a repeated signal cannot end the process before it reports how
        it ended) and the lock."""
        try:
            self.wait()
            if self._uploader is not None:
                pending = sorted(self._uploader.pending())
                if pending:
                    self.accelerator.print(f"checkpoint: waiting for the upload of {', '.join(pending)} to "
                                           f"{self.remote}")
                self._uploader.close()
                self._raise_if_upload_failed()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            self.strategy.close()
            # A stop that was honoured stays handled until the process ends: a worker whose launcher
            # was killed gets SIGTERM again as it shuts down (seen in the launcher-death test: the
            # repeat came after close, and the default action ended it before it wrote how it ended).
            # A repeat says nothing new; a second SIGINT still raises KeyboardInterrupt.
            if self._stop is not None and self._stop.signum is None:
                self._stop.uninstall()
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # ----------------------------------------------------------------------------------- signals
    def stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM, SIGINT or SIGUSR1 (needs ``handle_signals``).

        Check it between steps, then ``save(step, reason="emergency", wait=True)`` and leave the loop.
        A collective call when there are several processes (one tiny all-reduce on a CPU group).
        """
        return self._stop is not None and self._stop.agreed()

    @property
    def stop_signal(self) -> signal.Signals | None:
        """The signal that asked to stop (None if none did)."""
        return None if self._stop is None or self._stop.signum is None else signal.Signals(self._stop.signum)

    # ------------------------------------------------------------------------------------ loading
    def resolve(self, spec: str, exclude: tuple[str, ...] = ()) -> Path | None:
        """The folder ``spec`` names for a resume leaving out ``exclude``, the same on every rank:
        verified but for the tensor files the resume hashes as it reads them (sizes checked)."""
        return resolve_on_main(self.accelerator, spec, self.root.parent, remote=self.remote,
                               checksums=for_resume(reset_optimizer="optimizer" in exclude))

    def resume(self, spec: str | Path = "latest", exclude: tuple[str, ...] = (), *, folder=_UNRESOLVED) -> int:
        """Restore everything from ``spec``: ``latest`` (the newest valid checkpoint, falling back past
        corrupt ones), ``best``, ``step-<N>``, or a path.

        Args:
            spec: which checkpoint; ``latest`` with none yet means a fresh start.
            exclude: parts to leave as they are: "optimizer", "scheduler", "dataloader", or an
                ``extra`` name (e.g. to start the optimizer fresh on the saved weights).
            folder: what ``spec`` already resolved to on every rank (:func:`resolve_on_main`, with
                :func:`~.manifest.for_resume` checksums), so it is not resolved twice; None: nothing
                to resume.

        Returns:
            The restored step, or 0 when there was nothing to resume.

        Raises:
            CheckpointError: unknown or invalid checkpoint, refused by ``before_resume``, or a state
                that does not fit this run (naming it).

        A tensor file found damaged while it is read (its checksum is compared in the same pass)
        makes the resume start over from the checkpoint ``spec`` falls back to (``latest``: the
        newest older one that verifies), loaded whole; a ``spec`` that names the damaged checkpoint
        raises instead, and the model's weights must then be loaded again before use.
        """
        acc = self.accelerator
        asked = tuple(exclude)
        if folder is _UNRESOLVED:
            folder = self.resolve(str(spec), asked)  # a Path names a folder, as its string does
        if folder is None:
            acc.print(f"--resume_from_checkpoint={spec}: no checkpoint under {self.root} yet; starting fresh")
            return 0
        folder = Path(folder)
        manifest = read_manifest(folder)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{folder}: written in checkpoint format {manifest.get('format_version')}, this "
                                  f"accel_trainer resumes format {FORMAT_VERSION}: run accel-trainer upgrade {folder} "
                                  "first (rewrites it atomically; its weights load as they are)")
        if self.before_resume is not None:
            self.before_resume(folder)
        unknown = set(exclude) - set(PARTS) - set(self.extra)
        if unknown:
            raise ValueError(f"resume(exclude=...): {sorted(unknown)} name no part; use {list(PARTS)} or an extra name")
        if is_weights_only(manifest):
            if "optimizer" not in exclude:
                raise CheckpointError(f"{folder} is weights-only (--full_state_total_limit dropped its optimizer "
                                      "state, data position and RNG); resume it with --reset_optimizer (its weights "
                                      "and counters, the data from its beginning), or start from its weights with "
                                      f"--init_from {folder}")
            exclude = tuple(set(exclude) | {"dataloader", "scheduler"})
            acc.print(f"{folder} is weights-only: loading its weights and counters; the optimizer, the data position "
                      "and the RNG start fresh")
        refuse_code_in(folder)  # before anything of it is loaded
        damage = None
        try:
            self.strategy.load_engine_state(folder, tuple(exclude))
            self.strategy.load_tensors(folder, tuple(exclude))
        except DamagedFile as err:
            damage = str(err)
        damage = self._agree(damage)
        if damage:
            return self._resume_past_damage(spec, asked, folder, damage)
        if self.schedulers and "scheduler" not in exclude:
            self._load_named(folder, "schedulers", _Group(self.schedulers))
        if self.dataloader is not None and "dataloader" not in exclude:
            self._load_named(folder, "dataloader", self.dataloader)
            for note in getattr(self.dataloader, "notes", []):
                acc.print(note)
        for name, obj in self.extra.items():
            if name not in exclude:
                self._load_named(folder, name, obj)
        self._restore_rng(folder, manifest["step"], weights_only=is_weights_only(manifest))
        self.last_saved_step = manifest["step"]
        self.best = manifest.get("best")
        self._sequence = None  # the next save continues after what is on disk
        acc.print(f"resumed from {folder}: step {manifest['step']}")
        return manifest["step"]

    def _resume_past_damage(self, spec, exclude: tuple[str, ...], folder: Path, damage: str) -> int:
        """Resume again from what ``spec`` resolves to once ``folder``'s every checksum is compared
        (the damaged ``folder`` then no longer verifies)."""
        acc = self.accelerator
        acc.print(f"WARNING: {damage}: found while resuming {folder}; looking again for "
                  f"--resume_from_checkpoint={spec} with every checksum compared")
        again = resolve_on_main(acc, str(spec), self.root.parent, remote=self.remote,
                                checksums=EXCEPT_OPTIMIZER if "optimizer" in exclude else True)
        if again is None or Path(again) == folder:  # the damage did not show on a second read
            raise CheckpointError(f"{damage} (read while resuming {folder}); run accel-trainer verify {folder}")
        return self.resume(spec, exclude, folder=again)

    def _load_named(self, folder: Path, name: str, obj) -> None:
        state = read_state(folder, name)
        try:
            obj.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise CheckpointError(f"{folder}: state {name!r} does not fit this run ({type(err).__name__}: "
                                  f"{err})") from None

    def _restore_rng(self, folder: Path, step: int, weights_only: bool = False) -> None:
        acc = self.accelerator
        path = folder / rng_file(acc.process_index)
        if not path.exists():
            seed = rng.seed_new_rank(acc.process_index, step)
            if not weights_only:  # said already, once, for the whole weights-only checkpoint
                warnings.warn(f"rank {acc.process_index}: {folder} has no saved RNG for this rank (saved with a "
                              f"smaller world size); its generators are seeded with {seed} instead", stacklevel=3)
            return
        for note in rng.restore(path):
            warnings.warn(f"rank {acc.process_index}: {note}", stacklevel=3)


def resolve_on_main(accelerator, spec: str, output_dir: str | Path, checksums: bool | set[str] = True,
                    remote: RemoteTier | None = None) -> Path | None:
    """:func:`layout.resolve` on the main process, its answer (or error) shared with every rank, so
    that all load the same folder (a collective call). None: ``latest`` with nothing saved yet.
    With ``remote``, the object store is looked at too and a newer checkpoint there is downloaded."""
    answer = [None, None]
    if accelerator.is_main_process:
        try:
            found = (resolve(spec, output_dir, checksums=checksums) if remote is None else
                     resolve_with_remote(spec, output_dir, remote, checksums=checksums, report=accelerator.print))
            answer = [None if found.path is None else str(found.path), None]
        except CheckpointError as err:
            answer = [None, str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    if answer[1]:
        raise CheckpointError(answer[1])
    return None if answer[0] is None else Path(answer[0])


class _Group:
    """Several named stateful objects as one (the schedulers' file holds them by name)."""

    def __init__(self, members: dict):
        self.members = members

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.members):
            raise ValueError(f"saved {sorted(state)} but this run has {sorted(self.members)}")
        for name, member in self.members.items():
            member.load_state_dict(state[name])
