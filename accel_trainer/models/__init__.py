"""Model definitions. Importing this package registers them with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_moe import MoEConfig
from .modeling_moe import MoECausalLMOutput, MoEForCausalLM, MoEModel, count_parameters, parameter_counts

AutoConfig.register(MoEConfig.model_type, MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)

__all__ = ["MoEConfig", "MoEForCausalLM", "MoEModel", "MoECausalLMOutput", "count_parameters", "parameter_counts"]
