"""accel_trainer: crash-proof LLM training on Hugging Face Accelerate."""

__version__ = "0.1.0"

from .models import MoEConfig, MoEForCausalLM  # noqa: E402  (registers the Auto classes)
from .checkpoint import CheckpointError, LoadReport, load_model_for_inference, load_weights  # noqa: E402

__all__ = ["CheckpointError", "LoadReport", "MoEConfig", "MoEForCausalLM", "load_model_for_inference",
           "load_weights", "__version__"]
