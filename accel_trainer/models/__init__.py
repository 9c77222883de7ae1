"""Model families and the models they build; this face is what the rest of the house imports.

Importing it registers the three families that ship (our MoE, any transformers causal LM, your
own module) and our MoE's classes with the transformers Auto classes.
"""

from .building import (CUSTOM_KEY, ModelPlan, ModelShape, build_on_meta, check_folder_or_hub, config_from_json,
                       count_parameters_of, custom_config_json, first_attr, load_auto_config, logits_of, loss_of,
                       plan_custom, plan_hugging_face, plan_model, plan_preset)
from .configuration_moe import MoEConfig
from .family import (CUSTOM, HUGGING_FACE, ModelFamily, default_family, families, family_named, family_of,
                     family_of_model, family_of_preset, register_family, unregister_family)
from .hf_folder import SHARD_BYTES, write_hf_weights
from .lora import (LORA_KEY, adapters_of_checkpoint, apply_lora, check_same_base, is_adapter_folder, is_lora,
                   load_adapter_folder, lora_config, merged, quantization_config, require_peft, save_adapter)
from .modeling_moe import (MoECausalLMOutput, MoEFeedForward, MoEForCausalLM, MoEModel, count_parameters,
                           parameter_counts)
from .moe_family import ACCEL_MOE

for _family in (ACCEL_MOE, HUGGING_FACE, CUSTOM):  # the first is the default preset's (``--preset tiny``)
    register_family(_family)

__all__ = ["ACCEL_MOE", "adapters_of_checkpoint", "apply_lora", "build_on_meta", "check_folder_or_hub",
           "check_same_base", "config_from_json", "count_parameters", "count_parameters_of", "CUSTOM",
           "custom_config_json", "CUSTOM_KEY", "default_family", "families", "family_named", "family_of",
           "family_of_model", "family_of_preset", "first_attr", "HUGGING_FACE", "is_adapter_folder", "is_lora",
           "load_adapter_folder", "load_auto_config", "logits_of", "lora_config", "LORA_KEY", "loss_of", "merged",
           "ModelFamily", "ModelPlan", "ModelShape", "MoECausalLMOutput", "MoEConfig", "MoEFeedForward",
           "MoEForCausalLM", "MoEModel", "parameter_counts", "plan_custom", "plan_hugging_face", "plan_model",
           "plan_preset", "quantization_config", "register_family", "require_peft", "save_adapter", "SHARD_BYTES",
           "unregister_family", "write_hf_weights"]
