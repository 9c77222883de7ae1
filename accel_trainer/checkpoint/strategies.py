"""The ways a checkpoint's model and optimizer tensors are written and read back, one class each.

The :class:`~.manager.Checkpointer` runs one save protocol (reserve -> write -> commit, each phase
ending in one agreement of all ranks) and one resume order; what differs between kinds of model is
only *who writes the big tensors and how*, so that is a strategy chosen once, not a branch at every
step:

* :class:`TensorFiles` (a model held whole on each rank: one process, DDP): the main process writes
  ``model.safetensors`` and ``optimizer.safetensors`` itself, streamed and hashed, by parameter
  name, now or from staging buffers in a background thread (``*.ztensors`` when compressed).
* :class:`Sharded` (DTensor parameters: FSDP2): every rank writes its shards of the model and the
  named optimizers through ``torch.distributed.checkpoint`` into ``sharded/``; rank 0 commits only
  once every rank reported its files (see :mod:`.sharded`).
* :class:`EngineOwned` (FSDP1, DeepSpeed, Megatron, XLA): the engine's own ``save_state`` writes the
  model and optimizer in its format; only the named state is ours.

Accelerate's per-rank share (every rank's RNG, the fp16 grad scaler) goes through its public
``save_accelerator_state``/``load_accelerator_state`` with explicit lists in the first two; only the
engine-owned case needs ``Accelerator.save_state`` itself, and so its private lists (see there).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from accelerate.utils import DistributedType

from . import optimizer_files
from .format import (FROZEN_WEIGHTS, MANIFEST, MODEL_WEIGHTS, OPTIMIZER_TENSORS, PICKLED_SUFFIXES, SHARDED_DIR,
                     read_in_one_pass, stored_name, weight_files, writer_rank)
from ..errors import DamagedFile
from .io import CheckpointError, check_dcp_metadata_is_data, check_pickle_is_data, fsync_tree
from .manifest import saved_digests, verify
from .sharded import Channel, ShardedState, is_sharded
from .tensor_files import SafetensorsFile, StagingBuffers
from .ztensors import ZstdTensorFile
from .weights import load_weights_in_place, normalize_key, normalize_state_dict

# Sharded or engine-managed states stay entirely with Accelerate (it knows how to gather/shard them).
ENGINE_OWNED = {DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA}


def refuse_code_in(folder: Path) -> None:
    """Before anything of ``folder`` is loaded: refuse pickle-based files that could run code."""
    for path in Path(folder).rglob("*"):
        if path.suffix in PICKLED_SUFFIXES and path.is_file():
            check_pickle_is_data(path)
        elif path.name == ".metadata" and path.is_file():  # sharded (DCP) checkpoints
            check_dcp_metadata_is_data(path)


@dataclass
class SaveParts:
    """What a strategy writes and reads, and how it hands a written folder over: the strategy holds
    this record, never the Checkpointer, so when a save commits is decided in one place (the
    manager's ``commit``), even from the background thread.

    Attributes:
        commit: ``(tmp, final, record, digests, upload) -> problems``: manifest, marker, rename,
            pointers, retention (and the upload unless ``upload`` is False); main process only.
        upload: ``(final, record) -> None``: submit a committed folder to the object store (if any).
    """

    accelerator: Any
    model: Any
    optimizers: dict
    schedulers: dict
    raw_loader: Any
    commit: Callable[..., list]
    upload: Callable[[Path, dict], None]
    compression: str | None = None  # "zstd": tensor files as ztensors (see ztensors.py)
    compression_level: int = 3
    store_frozen: bool = True  # False: frozen parameters are not written (see CheckpointConfig)

    def frozen_names(self) -> set[str]:
        """The model's parameters that need no gradient, by their names on disk."""
        model = self.accelerator.unwrap_model(self.model)
        return {normalize_key(n) for n, p in model.named_parameters() if not p.requires_grad}

    def not_stored(self) -> set[str]:
        """What checkpoints leave out on purpose: with ``store_frozen`` False the frozen parameters
        and the buffers (all rebuilt from where they came from); else nothing."""
        if self.store_frozen:
            return set()
        buffers = {normalize_key(n) for n, _ in self.accelerator.unwrap_model(self.model).named_buffers()}
        return self.frozen_names() | buffers


class WriteStrategy:
    """How the big tensors of one checkpoint are written (and read back by :meth:`load_tensors`)."""

    #: Can write in a background thread (``async_save``).
    background = True
    #: Every rank takes part in the commit (else only the main process commits).
    every_rank_commits = False

    def __init__(self, parts: SaveParts):
        self.parts = parts
        self.accelerator = parts.accelerator

    # ----------------------------------------------------------------------------------- saving
    def save_engine_state(self, tmp: Path, step: int) -> None:
        """Every rank: Accelerate's share of the checkpoint, its RNG and the grad scaler."""
        from accelerate.checkpointing import save_accelerator_state

        acc = self.accelerator
        save_accelerator_state(str(tmp), [], [], [], [], acc.process_index, step,
                               scaler=getattr(acc, "scaler", None), safe_serialization=True)

    def write_tensors(self, tmp: Path, stage: bool) -> dict:
        """After the named state is written: the big files still to write (staged when ``stage``)."""
        return {}

    def finish(self, tmp: Path, final: Path, record: dict, big: dict) -> list[str]:
        """Write ``big`` and commit (maybe in a background thread); returns what failed after the commit."""
        fsync_tree(tmp)
        return self.parts.commit(tmp, final, record, {})

    # ---------------------------------------------------------------------------------- loading
    def load_engine_state(self, folder: Path, exclude: tuple[str, ...]) -> None:
        """Every rank: the grad scaler (the RNG is restored last, by the Checkpointer itself)."""
        from accelerate.checkpointing import load_accelerator_state

        acc = self.accelerator
        scaler = getattr(acc, "scaler", None)
        if scaler is not None:
            load_accelerator_state(str(folder), [], [], [], [], acc.process_index, scaler=scaler)

    def load_tensors(self, folder: Path, exclude: tuple[str, ...]) -> None:
        """The model's weights and the named optimizers' state, from whichever layout ``folder`` has:
        ``sharded/`` (any world size, sharded or not: DCP reshards or gathers by name) or our files.

        Raises:
            DamagedFile: one of our files is not the one saved (the weights may be half loaded; the
                optimizers are untouched).
        """
        parts, acc = self.parts, self.accelerator
        load_optimizers = bool(parts.optimizers) and "optimizer" not in exclude
        if (folder / SHARDED_DIR / ".metadata").is_file():
            shards = getattr(self, "shards", None) or ShardedState(acc.unwrap_model(parts.model), parts.optimizers)
            shards.load(folder / SHARDED_DIR, optimizers=load_optimizers)
            return
        weights = weight_files(folder)
        if not weights:
            raise CheckpointError(f"{folder}: no {MODEL_WEIGHTS} (nor {stored_name(MODEL_WEIGHTS, True)}) to resume")
        # Each tensor file is read once and hashed as it is read; the resolution checked sizes only.
        digests = saved_digests(folder)
        load_weights_in_place(weights, acc.unwrap_model(parts.model), digests, skip=parts.not_stored())
        if load_optimizers:
            device = "cpu" if acc.device.type == "cpu" else str(acc.device)  # safetensors says "cpu", not "cpu:0"
            optimizer_files.load_into(folder, parts.optimizers, parameter_names(acc, parts.model), device, digests)

    def files_to_upload(self, folder: Path, rank: int) -> list[str]:
        """The files of the committed checkpoint ``folder`` that ``rank`` uploads: here rank 0 all of them."""
        return _manifest_files(folder) if rank == 0 else []

    def close(self) -> None:
        pass


CONTENT_KEY = "content_xxh3_128"  # in a frozen-weights file's metadata: what its tensors are, however stored


def unchanged_in_previous(root: Path, stored: str, content: str) -> tuple[Path, str] | None:
    """``(file, its manifest checksum)`` of ``stored`` in the latest checkpoint under ``root`` when that
    file holds tensors of digest ``content`` and still has that checksum (read once: a damaged file is
    written afresh, never linked into a new checkpoint); else None."""
    from .checksums import HASH, hash_file
    from .io import read_json
    from .storage import LocalStorage
    from .stored_tensors import stored_metadata

    name = LocalStorage(root).read_pointer("latest")
    source = root / name / stored if name else None
    try:
        if source is None or not source.is_file() or stored_metadata(source).get(CONTENT_KEY) != content:
            return None
        expected = read_json(root / name / MANIFEST)["files"][stored][HASH]
    except (CheckpointError, OSError, KeyError, TypeError):
        return None
    return (source, expected) if hash_file(source) == expected else None


def _manifest_files(folder: Path) -> list[str]:
    import json

    return list(json.loads((folder / MANIFEST).read_text())["files"])


def parameter_names(accelerator, model) -> dict[int, str]:
    """Parameter id -> its name without DDP/compile prefixes (how optimizer state is keyed on disk)."""
    return {id(p): normalize_key(n) for n, p in accelerator.unwrap_model(model).named_parameters()}


class TensorFiles(WriteStrategy):
    """A model held whole on every rank: the main process writes its weights and the optimizers'
    state as safetensors by name, hashing the bytes on the way."""

    def __init__(self, parts: SaveParts):
        super().__init__(parts)
        self.staging = StagingBuffers()

    def write_tensors(self, tmp: Path, stage: bool) -> dict:
        acc, parts = self.accelerator, self.parts
        if not acc.is_main_process:
            return {}
        model = normalize_state_dict(acc.get_state_dict(parts.model))
        opt_tensors, description = optimizer_files.split_state(parts.optimizers, parameter_names(acc, parts.model))
        optimizer_files.write_description(tmp, description)
        left_out = parts.not_stored()
        model = {k: v for k, v in model.items() if k not in left_out}
        frozen = parts.frozen_names()
        big = {MODEL_WEIGHTS: {k: v for k, v in model.items() if k not in frozen}, OPTIMIZER_TENSORS: opt_tensors}
        if frozen and parts.store_frozen:
            big[FROZEN_WEIGHTS] = {k: v for k, v in model.items() if k in frozen}
        if stage:
            big = {name: self.staging.stage(name, t) for name, t in big.items()}
        return big

    def _file(self, tensors: dict, metadata: dict | None = None):
        if self.parts.compression == "zstd":
            return ZstdTensorFile(tensors, metadata, level=self.parts.compression_level)
        return SafetensorsFile(tensors, metadata)

    def finish(self, tmp: Path, final: Path, record: dict, big: dict) -> list[str]:
        # Compressed here, so in the background thread of an async save too (zstd runs outside the GIL).
        compressed = self.parts.compression is not None
        files, linked = {}, {}
        for name, tensors in big.items():
            stored = stored_name(name, compressed)
            if name == FROZEN_WEIGHTS:
                content = SafetensorsFile(tensors).digest()  # names, shapes, dtypes and bytes, at memory speed
                previous = unchanged_in_previous(final.parent, stored, content)
                if previous is not None:  # the previous checkpoint's file, verified: linked, not written
                    os.link(previous[0], tmp / stored)
                    linked[stored] = previous[1]
                    continue
                files[stored] = self._file(tensors, {CONTENT_KEY: content})
            else:
                files[stored] = self._file(tensors)
        for name, file in files.items():
            file.write(tmp / name, fsync=False)
        # One flush for the whole checkpoint (every file, then the folder) while a thread hashes the
        # same bytes from memory: the checksums cost no time of their own.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum") as hasher:
            digests = hasher.submit(lambda: {name: file.digest() for name, file in files.items()})
            fsync_tree(tmp)
            digests = digests.result()
        return self.parts.commit(tmp, final, record, {**digests, **linked})


class Sharded(WriteStrategy):
    """DTensor parameters (FSDP2): every rank writes its shards through DCP; rank 0 commits once
    every rank reported its files written."""

    every_rank_commits = True

    def __init__(self, parts: SaveParts):
        super().__init__(parts)
        self.shards = ShardedState(parts.accelerator.unwrap_model(parts.model), parts.optimizers, parts.compression)

    def write_tensors(self, tmp: Path, stage: bool) -> dict:
        return {SHARDED_DIR: self.shards.save(tmp / SHARDED_DIR, background=stage)}

    def finish(self, tmp: Path, final: Path, record: dict, big: dict) -> list[str]:
        """Every rank (maybe in its background thread): wait for its shards, hash them, report to
        rank 0, which commits only when every rank's files are written; all learn the outcome."""
        problem, digests = None, {}
        try:
            if big.get(SHARDED_DIR) is not None:
                big[SHARDED_DIR].result()  # this rank's files (fsynced by DCP's writer) and the metadata
            digests = self.shards.own_digests(tmp / SHARDED_DIR)
        except Exception as err:
            problem = f"{type(err).__name__}: {err}"
        reports = self.shards.channel.gather((problem, digests))
        outcome = None
        if reports is not None:  # rank 0
            failed = [f"rank {r}: {p}" for r, (p, _) in enumerate(reports) if p]
            if failed:
                outcome = ("error", "; ".join(failed)[:2000])
            else:
                try:
                    fsync_tree(tmp)
                    merged = {k: v for _, d in reports for k, v in d.items()}
                    outcome = ("ok", self.parts.commit(tmp, final, record, merged, upload=False))
                except Exception as err:
                    outcome = ("error", f"{type(err).__name__}: {err}")
        outcome = self.shards.channel.broadcast(outcome)
        if outcome[0] == "error":
            raise CheckpointError(outcome[1])
        self.parts.upload(final, record)  # every rank: each uploads its own shards
        return outcome[1] if self.accelerator.is_main_process else []

    def load_tensors(self, folder: Path, exclude: tuple[str, ...]) -> None:
        from torch.distributed.fsdp import FSDPModule

        # Expert parallelism under DDP shards only the expert stacks: whole tensors are sliced per rank.
        fsdp = any(isinstance(m, FSDPModule) for m in self.accelerator.unwrap_model(self.parts.model).modules())
        if fsdp and not (folder / SHARDED_DIR / ".metadata").is_file():
            raise CheckpointError(f"{folder}: saved by a run whose model was not sharded; this sharded (FSDP2) run "
                                  "resumes sharded checkpoints only. Start from its weights with --init_from "
                                  f"{folder} (the optimizer starts fresh)")
        super().load_tensors(folder, exclude)

    def files_to_upload(self, folder: Path, rank: int) -> list[str]:
        """Each rank uploads the files it wrote (its shards; rank 0 the rest): every node's bandwidth."""
        return [f for f in _manifest_files(folder) if writer_rank(f) == rank]

    def close(self) -> None:
        self.shards.close()


class EngineOwned(WriteStrategy):
    """FSDP1, DeepSpeed, Megatron, XLA: the engine's ``save_state`` writes the model and optimizer
    in its own (sharded) format, synchronously; the named state is still ours."""

    background = False

    def save_engine_state(self, tmp: Path, step: int) -> None:
        with self._accelerate_skips_what_we_save(hide_optimizers=False):
            self.accelerator.save_state(str(tmp), safe_serialization=True)

    def load_engine_state(self, folder: Path, exclude: tuple[str, ...]) -> None:
        # The engine reads without hashing: the files a resume leaves to its reader are verified first.
        left_to_reader = {name for name in saved_digests(folder) if read_in_one_pass(name)}
        problems = verify(folder, checksums=left_to_reader) if left_to_reader else []
        if problems:
            raise DamagedFile(problems[0])
        with self._accelerate_skips_what_we_save(hide_optimizers="optimizer" in exclude):
            self.accelerator.load_state(str(folder))

    def load_tensors(self, folder: Path, exclude: tuple[str, ...]) -> None:
        pass  # the engine loaded its model and optimizer in load_engine_state

    @contextmanager
    def _accelerate_skips_what_we_save(self, hide_optimizers: bool):
        """Hide the schedulers and loader we save by name (and the optimizers, when asked) from
        ``save_state``/``load_state``.

        Accelerate saves and loads every prepared optimizer, scheduler and dataloader by position
        (``optimizer.bin``, ``scheduler.bin``, ...) and has no public switch to leave some out, and
        its public ``save_accelerator_state`` cannot write an engine's sharded model: so for this
        call its private lists hold only what we do not save ourselves. Pinned by
        ``tests/unit/test_checkpointer.py::test_accelerate_private_lists_that_we_filter_still_exist``.
        """
        acc, parts = self.accelerator, self.parts
        saved = acc._optimizers, acc._schedulers, acc._dataloaders
        ours_params = {id(p) for opt in parts.optimizers.values() for g in opt.param_groups for p in g["params"]}
        ours_schedulers = {id(s) for s in parts.schedulers.values()}
        try:
            if hide_optimizers:
                acc._optimizers = [o for o in saved[0]
                                   if not all(id(p) in ours_params for g in o.param_groups for p in g["params"])]
            acc._schedulers = [s for s in saved[1]
                               if id(s) not in ours_schedulers and id(getattr(s, "scheduler",
                                                                              None)) not in ours_schedulers]
            acc._dataloaders = [d for d in saved[2] if d is not parts.raw_loader]
            yield
        finally:
            acc._optimizers, acc._schedulers, acc._dataloaders = saved


def choose_strategy(parts: SaveParts) -> WriteStrategy:
    """The strategy for this run's model, chosen once."""
    if is_sharded(parts.accelerator.unwrap_model(parts.model)):
        return Sharded(parts)
    if getattr(parts.accelerator, "distributed_type", None) in ENGINE_OWNED:
        return EngineOwned(parts)
    return TensorFiles(parts)


__all__ = ["ENGINE_OWNED", "EngineOwned", "SaveParts", "Sharded", "TensorFiles", "WriteStrategy", "choose_strategy",
           "parameter_names", "refuse_code_in", "Channel"]
