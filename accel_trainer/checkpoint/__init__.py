"""Crash-proof checkpoints for any Accelerate loop: save, verify, resolve, resume, and load weights or
whole models for inference. See :class:`Checkpointer`."""

from .dataloader import ResumableLoader
from .inference import load_model_for_inference
from .io import CheckpointError
from .layout import list_checkpoints, resolve, resolve_path
from .manager import Checkpointer
from .manifest import verify
from .weights import LoadReport, load_weights

__all__ = ["Checkpointer", "CheckpointError", "LoadReport", "ResumableLoader", "list_checkpoints",
           "load_model_for_inference", "load_weights", "resolve", "resolve_path", "verify"]
