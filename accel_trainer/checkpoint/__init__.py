"""Crash-proof checkpoints for any Accelerate loop: save, verify, resolve, resume, and load weights or
whole models for inference. See :class:`Checkpointer`.

Names are imported on first use, so tools that only read checkpoint metadata (``accel-trainer
list``, ``verify``) start without loading torch.
"""

from accel_trainer.lazy import lazy_names

_WHERE = {"Checkpointer": ".manager", "CheckpointError": ".io", "LoadReport": ".weights",
          "ResumableLoader": ".dataloader", "list_checkpoints": ".layout", "load_model_for_inference": ".inference",
          "load_weights": ".weights", "resolve": ".layout", "resolve_path": ".layout", "verify": ".manifest"}

__all__ = sorted(_WHERE)


__getattr__ = lazy_names(__name__, _WHERE)
