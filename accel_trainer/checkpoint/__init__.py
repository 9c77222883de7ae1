"""Crash-proof checkpoints for any Accelerate loop: save, verify, resolve, resume, and load weights or
whole models for inference. See :class:`Checkpointer`.

Names are imported on first use, so tools that only read checkpoint metadata (``accel-trainer
list``, ``verify``) start without loading torch.
"""

import importlib

_WHERE = {"Checkpointer": ".manager", "CheckpointError": ".io", "LoadReport": ".weights",
          "ResumableLoader": ".dataloader", "list_checkpoints": ".layout", "load_model_for_inference": ".inference",
          "load_weights": ".weights", "resolve": ".layout", "resolve_path": ".layout", "verify": ".manifest"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
