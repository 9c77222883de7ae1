"""accel_trainer: crash-proof LLM training on Hugging Face Accelerate."""

__version__ = "0.1.0"

from .models import MoEConfig, MoEForCausalLM  # noqa: E402  (registers the Auto classes)
from .checkpoint import CheckpointError, Checkpointer, LoadReport, ResumableLoader, load_weights  # noqa: E402
from .checkpoint import load_model_for_inference as _load_model_for_inference  # noqa: E402


def load_model_for_inference(path, device=None, dtype=None, strict: bool = False, config=None):
    """:func:`accel_trainer.checkpoint.load_model_for_inference`; old single-file checkpoints whose
    ``config`` names no model type are read as this package's :class:`MoEConfig`."""
    return _load_model_for_inference(path, device=device, dtype=dtype, strict=strict, config=config,
                                     legacy_config_class=MoEConfig)


__all__ = ["CheckpointError", "Checkpointer", "LoadReport", "MoEConfig", "MoEForCausalLM", "ResumableLoader",
           "load_model_for_inference", "load_weights", "__version__"]
