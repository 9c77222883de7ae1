"""Model definitions. Importing this package registers them with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .building import (CUSTOM_KEY, ModelPlan, ModelShape, build_on_meta, check_folder_or_hub, config_from_json, count_parameters_of, custom_config_json, logits_of, loss_of,
                       plan_custom, plan_hugging_face)
from .configuration_moe import MoEConfig
from .modeling_moe import MoECausalLMOutput, MoEFeedForward, MoEForCausalLM, MoEModel, count_parameters, parameter_counts

AutoConfig.register(MoEConfig.model_type, MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM, exist_ok=True)

__all__ = ["CUSTOM_KEY", "MoEConfig", "MoEFeedForward", "MoEForCausalLM", "MoEModel", "MoECausalLMOutput", "ModelPlan", "ModelShape", "build_on_meta", "check_folder_or_hub", "config_from_json",
           "count_parameters", "count_parameters_of", "custom_config_json", "logits_of", "loss_of", "parameter_counts", "plan_custom",
           "plan_hugging_face"]
