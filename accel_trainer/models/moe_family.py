"""Our MoE family (``accel_moe``): its record, and its export as the stock Qwen2-MoE architecture.

Two export formats:

- ``qwen2_moe`` (default): the stock ``transformers`` Qwen2-MoE architecture, which computes the same
  function as our model, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads it with no code of
  ours, and so do the serving stacks that know Qwen2-MoE. Tensors are written in that architecture's
  published on-disk layout (one tensor per expert, as the Qwen1.5-MoE checkpoints have), which
  ``transformers`` fuses on load.
- ``accel_moe``: our own class (``model_type`` "accel_moe"); loads after ``import accel_trainer`` and is
  what ``--init_from`` and ``load_model_for_inference`` read back exactly.

Why the mapping is exact: Qwen2-MoE has the same pre-norm blocks (RMSNorm, RoPE with rotate-half,
grouped-query SDPA attention, softmax top-k router with optional renormalisation, SwiGLU experts and
a shared SwiGLU expert). It differs in three places, each exported as an exact
identity: q/k/v projections with biases (exported as zeros; ``qkv_bias`` stays on because older
``transformers`` and serving stacks hard-code those biases), a sliding-window switch (off), and a gate
on the shared expert, ``sigmoid(x @ w)``: with ``w = 0`` that factor is exactly 0.5, so the shared
expert's ``down_proj`` is exported doubled (a power of two: exact in every float format).
"""

from __future__ import annotations

import json

import torch

from ..checkpoint import write_json
from ..optim import ParameterRule
from .configuration_moe import MoEConfig
from .family import ModelFamily
from .hf_folder import write_hf_weights
from .modeling_moe import MoEFeedForward, MoEForCausalLM, grouped_mm_works, parameter_counts
from .presets import DEFAULTS, PRESETS


def qwen2_moe_config(config: MoEConfig, dtype: torch.dtype):
    """The ``Qwen2MoeConfig`` whose model computes what ``MoEForCausalLM(config)`` computes."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        # intermediate_size sizes Qwen2-MoE's dense layers; with decoder_sparse_step=1 there are none.
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.moe_intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        use_sliding_window=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
        moe_intermediate_size=config.moe_intermediate_size, num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok, norm_topk_prob=config.norm_topk_prob,
        shared_expert_intermediate_size=config.shared_expert_intermediate_size,
        router_aux_loss_coef=config.router_aux_loss_coef, initializer_range=config.initializer_range,
        architectures=["Qwen2MoeForCausalLM"], dtype=dtype,
    )


def qwen2_moe_tensors(state: dict[str, torch.Tensor], config: MoEConfig) -> dict[str, torch.Tensor]:
    """Our state dict under Qwen2-MoE's on-disk names (per-expert slices are views, not copies)."""
    out = {}
    for name, tensor in state.items():
        prefix, _, leaf = name.rpartition(".")
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # tied: Qwen2-MoE reads it from the embedding, as we do
        if ".mlp." not in name:  # embeddings, attention, norms, head: the same names
            out[name] = tensor
            if prefix.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                out[f"{prefix}.bias"] = tensor.new_zeros(tensor.shape[0])
        elif prefix.endswith(".mlp") and leaf in ("gate_proj", "up_proj", "down_proj"):  # stacked experts
            for e in range(tensor.shape[0]):
                out[f"{prefix}.experts.{e}.{leaf}.weight"] = tensor[e]
        elif name.endswith(".mlp.router.weight"):
            out[name.replace(".mlp.router.", ".mlp.gate.")] = tensor
        elif name.endswith(".mlp.shared_expert.down_proj.weight"):
            out[name] = tensor * 2  # undoes the 0.5 of the zero shared-expert gate below
        elif ".mlp.shared_expert." in name:
            out[name] = tensor
        else:
            raise KeyError(f"export --format qwen2_moe: no Qwen2-MoE name for tensor {name!r}")
    for i in range(config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp"
        like = state[f"{mlp}.router.weight"]
        out[f"{mlp}.shared_expert_gate.weight"] = like.new_zeros(1, config.hidden_size)  # sigmoid(0) = 0.5
        if config.shared_expert_intermediate_size == 0:  # Qwen2-MoE always has one: give it width 0
            for proj, shape in (("gate_proj", (0, config.hidden_size)), ("up_proj", (0, config.hidden_size)),
                                ("down_proj", (config.hidden_size, 0))):
                out[f"{mlp}.shared_expert.{proj}.weight"] = like.new_zeros(shape)
    return out


def write_qwen2_moe(model: MoEForCausalLM, out, max_shard_bytes: int) -> None:
    """``export --format qwen2_moe``: the stock Qwen2-MoE folder that computes what ``model`` computes."""
    dtype = next(model.parameters()).dtype
    qwen2_moe_config(model.config, dtype).save_pretrained(out)
    meta = json.loads((out / "config.json").read_text())
    meta["rope_theta"] = model.config.rope_theta  # where transformers 4.x and most serving stacks read it
    write_json(out / "config.json", meta)
    write_hf_weights(out, qwen2_moe_tensors(model.state_dict(), model.config), max_shard_bytes)


def _write_accel_moe(model: MoEForCausalLM, out, max_shard_bytes: int) -> None:
    model.save_pretrained(out, max_shard_size=max_shard_bytes)


def moe_layers(model) -> list:
    """``[(name, layer)]`` of every MoE layer (expert parallelism shards their stacks)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]


def routed_expert_parameters(config: MoEConfig) -> tuple[int, int]:
    """(routed-expert parameters in all layers, those of the largest layer)."""
    if not config.num_experts:
        return 0, 0
    experts = parameter_counts(config)["experts"]
    return experts, experts // config.num_hidden_layers


def _prepare_compile(device, dtype) -> None:
    grouped_mm_works(device, dtype)  # the experts' kernel is chosen eagerly, before tracing


ACCEL_MOE = ModelFamily(
    name="accel_moe", model_type=MoEConfig.model_type, config_class=MoEConfig, model_class=MoEForCausalLM,
    presets=PRESETS, defaults=DEFAULTS,
    # The router is tiny and sensitive; embeddings and the head are found by the model's getters.
    parameter_rule=ParameterRule(adamw=((r"(^|\.)router\.weight$", "router"),)),
    export_formats={"qwen2_moe": write_qwen2_moe, "accel_moe": _write_accel_moe},
    load_hint="import accel_trainer.models; ",
    parallelisms=frozenset({"ep"}), expert_layers=moe_layers, expert_stacks=("gate_proj", "up_proj", "down_proj"),
    routed_expert_parameters=routed_expert_parameters, prepare_compile=_prepare_compile,
)

__all__ = ["ACCEL_MOE", "moe_layers", "qwen2_moe_config", "qwen2_moe_tensors", "write_qwen2_moe"]
