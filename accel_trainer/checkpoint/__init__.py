"""Crash-proof checkpoints for any Accelerate loop: save, verify, resolve, resume, and load weights or
whole models for inference. See :class:`Checkpointer`.

This module is the component's face: code outside ``accel_trainer/checkpoint/`` imports from here
only (a test keeps it so), and the component imports nothing of the trainer, models or data. The
on-disk names (``step-N``, ``COMPLETE``, ``config.json``, ...) are :mod:`.format`'s; the two tiers
where checkpoints live (a folder, an object store) answer one protocol, :class:`CheckpointStorage`.

Names are imported on first use, so tools that only read checkpoint metadata (``accel-trainer
list``, ``verify``) start without loading torch.
"""

from accel_trainer.lazy import lazy_names

_WHERE = {
    # the component
    "Checkpointer": ".manager", "CheckpointConfig": ".manager", "resolve_on_main": ".manager",
    "ResumableLoader": ".dataloader", "CheckpointError": ".io", "RemoteError": ".remote",
    # resolving and reading
    "resolve": ".layout", "resolve_path": ".layout", "checkpoint_folder": ".layout", "list_checkpoints": ".layout",
    "prune": ".layout", "write_pointer": ".layout",
    "verify": ".manifest", "EXCEPT_OPTIMIZER": ".manifest", "for_resume": ".manifest", "list_run": ".inspection",
    "verify_run": ".inspection",
    "inspect": ".inspection", "diff": ".inspection",
    # weights and models
    "LoadReport": ".weights", "load_weights": ".weights", "load_model_for_inference": ".inference",
    "load_state_into": ".weights", "normalize_state_dict": ".weights",
    # the tiers
    "CheckpointStorage": ".storage", "LocalStorage": ".storage", "WritableTier": ".storage", "RemoteTier": ".remote",
    "remote_tier": ".remote", "storage_for": ".remote",
    "fetch": ".remote", "is_url": ".remote", "parse_storage_options": ".remote", "redact": ".remote",
    "upgrade": ".upgrading", "upgrade_checkpoint": ".upgrading",
    # the run directory
    "RunLock": ".lock", "lock_run_dir": ".lock",
    # on-disk names
    "MODEL_CONFIG": ".format", "RUN_CONFIG": ".format", "COMPLETE": ".format", "MANIFEST": ".format",
    "CUSTOM_MODEL": ".format", "register_model": ".inference", "is_optimizer_file": ".format",
    # durable files, for other writers of the package (prepared data, exports)
    "atomic_write_text": ".io", "fsync_file": ".io", "fsync_tree": ".io", "read_json": ".io", "write_json": ".io",
    "hash_file": ".checksums", "SafetensorsFile": ".tensor_files", "ZstdTensorFile": ".ztensors",
    "read_tensor_file": ".stored_tensors", "tensor_file": ".format",
}

__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE)
