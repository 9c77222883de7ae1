"""Sharded (FSDP2) model and optimizer state through ``torch.distributed.checkpoint``, saved in the
background without stopping training, and committed by the same protocol as every checkpoint.

A model is sharded when its parameters are DTensors (``fully_shard``, or Accelerate's FSDP2). Its
state and every named optimizer's go, keyed by parameter name, to ``step-N/sharded/``: one file per
rank (``__<rank>_0.distcp``) and DCP's ``.metadata``, so the checkpoint loads on any world size,
and in one process without a process group (:func:`weights.consolidate_sharded`).

Async save, each rank (TorchTitan's ``async_with_pinned_mem``): the shards are copied into
reusable staging buffers (pinned host memory on a GPU) while training waits; that copy is all it
waits for. Writing the files, DCP's own metadata exchange, hashing this rank's files and telling
rank 0 run in a background thread on a gloo group of their own, so they never interleave with the
training's collectives. Rank 0 commits (manifest with every rank's checksums, ``COMPLETE``, rename,
``latest``) only once every rank reported its files written and fsynced; a process killed at any
instant leaves ``latest`` on the previous complete checkpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .checksums import hash_file
from .format import SHARDED_DIR, shard_files_glob
from .io import CheckpointError, check_dcp_metadata_is_data

__all__ = ["SHARDED_DIR", "Channel", "ShardedState", "is_sharded"]


def is_sharded(model) -> bool:
    """Whether ``model``'s parameters are DTensors (FSDP2's ``fully_shard``, or another DTensor layout)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _raw(optimizer):
    # Accelerate's wrapper steps through the GradientState; DCP initialises state by stepping.
    return getattr(optimizer, "optimizer", optimizer)


class Channel:
    """Gather and broadcast between the ranks' background threads, over a gloo group of its own:
    collectives there must not interleave with the training's (or another thread's). Created
    collectively (every rank at the same point); a single process needs none of it."""

    def __init__(self):
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.rank = dist.get_rank() if self.distributed else 0

    def gather(self, item):
        """Every rank's ``item`` on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [item]
        out = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(item, out, dst=dist.get_global_rank(self.group, 0), group=self.group)
        return out

    def broadcast(self, item):
        """Rank 0's ``item`` on every rank."""
        if not self.distributed:
            return item
        box = [item]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]


class ShardedState:
    """The sharded model and named optimizers of a run, saved and loaded with DCP.

    Args:
        model: the sharded model (unwrapped).
        optimizers: name -> optimizer over (some of) its parameters.
    """

    def __init__(self, model, optimizers: dict, compression: str | None = None):
        self.model, self.optimizers = model, optimizers
        self.compression = compression  # "zstd": DCP's own zstd stream extension on every shard file
        # DCP's collectives and ours in the background thread go over a group of their own.
        self.channel = Channel()
        self.distributed, self.group, self.rank = self.channel.distributed, self.channel.group, self.channel.rank
        self._stager = None

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model),
                "optimizer": {name: get_optimizer_state_dict(self.model, _raw(opt))
                              for name, opt in self.optimizers.items()}}

    # ------------------------------------------------------------------------------------ save
    def save(self, folder: Path, background: bool):
        """Write this rank's shards to ``folder`` (a collective call).

        Returns:
            None when written (``background`` False), else a Future that completes once this rank's
            files, and DCP's metadata, are on disk; training may change the parameters as soon as
            this returns (the state was staged).
        """
        import torch.distributed.checkpoint as dcp

        state = self.state_dict()
        writer = None
        if self.compression == "zstd":  # DCP's readers decode it by themselves (its extension registry)
            from torch.distributed.checkpoint._extension import ZStandard

            writer = dcp.FileSystemWriter(str(folder), _extensions=[ZStandard()])
        if not background:
            dcp.save(state, checkpoint_id=str(folder), storage_writer=writer, process_group=self.group,
                     no_dist=not self.distributed)
            return None
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if self._stager is None:  # its buffers are reused by every later save
            cuda = torch.cuda.is_available()
            # Staging is synchronous (the copy finishes before save() returns), so the next optimizer
            # step cannot race it; pinned memory makes that device-to-host copy run at full speed.
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=False, use_non_blocking_copy=cuda))
        result = dcp.async_save(state, checkpoint_id=str(folder), storage_writer=writer, process_group=self.group,
                                async_stager=self._stager, no_dist=not self.distributed)
        return getattr(result, "upload_completion", result)

    def own_digests(self, folder: Path) -> dict[str, str]:
        """Checksums of the files this rank wrote (read back from the page cache, just written)."""
        return {f"{SHARDED_DIR}/{p.name}": hash_file(p) for p in sorted(folder.glob(shard_files_glob(self.rank)))}

    # ------------------------------------------------------------------------------------ load
    def load(self, folder: Path, optimizers: bool = True) -> None:
        """Load the model (and optimizers) from a sharded folder, resharding to this world size.

        Raises:
            CheckpointError: unsafe metadata, or a state that does not fit this model (naming it).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        check_dcp_metadata_is_data(folder / ".metadata")
        state = self.state_dict()
        if not optimizers:
            state.pop("optimizer")
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=str(folder), process_group=self.group, no_dist=not self.distributed)
        except Exception as err:  # DCP wraps a missing key or a shape mismatch in CheckpointException
            raise CheckpointError(f"{folder}: the sharded state does not fit this model "
                                  f"({type(err).__name__}: {str(err).strip().splitlines()[-1][:300]})") from None
        set_model_state_dict(self.model, state["model"])
        for name, opt in self.optimizers.items() if optimizers else ():
            set_optimizer_state_dict(self.model, _raw(opt), state["optimizer"][name])

    def close(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None
