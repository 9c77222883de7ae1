"""accel_trainer: crash-proof LLM training on Hugging Face Accelerate."""

__version__ = "0.1.0"

from .models import MoEConfig, MoEForCausalLM  # noqa: E402  (registers the Auto classes)

__all__ = ["MoEConfig", "MoEForCausalLM", "__version__"]
