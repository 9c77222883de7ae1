"""Export trained weights as a Hugging Face model folder.

Two formats:

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
from pathlib import Path

import torch

from .checkpoint import SafetensorsFile, fsync_tree, write_json
from .models import MoEConfig

FORMATS = ("qwen2_moe", "accel_moe", "native")
SHARD_BYTES = 5 * 2**30  # the Hugging Face default shard size


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


def shard(tensors: dict[str, torch.Tensor], max_bytes: int = SHARD_BYTES) -> list[dict[str, torch.Tensor]]:
    """Split into files of at most ``max_bytes`` (a bigger tensor gets a file of its own), in key order."""
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current] if current else shards


def write_hf_weights(out: Path, tensors: dict[str, torch.Tensor], max_bytes: int = SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` as HF writes them."""
    parts = shard(tensors, max_bytes)
    if len(parts) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(parts):05d}.safetensors" for i in range(1, len(parts) + 1)]
        write_json(out / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, part in zip(names, parts) for key in part}})
    for name, part in zip(names, parts):
        SafetensorsFile(part, metadata={"format": "pt"}).write(out / name, fsync=False)  # one fsync_tree after
    return names


def ensure_new_folder(out: Path) -> None:
    """An export never overwrites: ``out`` must not exist or be empty (raises FileExistsError)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")


def export_model(model, out: Path, fmt: str | None = None, max_shard_bytes: int = SHARD_BYTES,
                 tokenizer=None) -> list[str]:
    """Write ``model`` (already in the wanted dtype) to the new folder ``out``, with ``tokenizer`` and
    a ``generation_config.json`` of its BOS/EOS/PAD when given, so that ``AutoTokenizer`` +
    ``AutoModelForCausalLM`` on the folder generate text that stops at EOS.

    ``fmt``: for our ``MoEForCausalLM``, ``qwen2_moe`` (default) or ``accel_moe``; any other
    transformers model is written as itself (``native``, its own ``save_pretrained``).

    Raises:
        ValueError: unknown ``fmt``, or one that does not apply to this model.
        FileExistsError: ``out`` exists and is not empty (an export never overwrites).
    """
    from .models import MoEForCausalLM

    ours = isinstance(model, MoEForCausalLM)
    fmt = fmt or ("qwen2_moe" if ours else "native")
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r}: unknown; choose one of {', '.join(FORMATS)}")
    if not ours and fmt != "native":
        raise ValueError(f"--format={fmt}: only for our MoE family; a {model.config.model_type} model is written "
                         "as itself (leave --format out)")
    ensure_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    if fmt in ("accel_moe", "native"):
        model.save_pretrained(out, max_shard_size=max_shard_bytes)
    else:
        qwen2_moe_config(model.config, dtype).save_pretrained(out)
        meta = json.loads((out / "config.json").read_text())
        meta["rope_theta"] = model.config.rope_theta  # where transformers 4.x and most serving stacks read it
        write_json(out / "config.json", meta)
        write_hf_weights(out, qwen2_moe_tensors(model.state_dict(), model.config), max_shard_bytes)
    if tokenizer is not None:
        from transformers import GenerationConfig

        tokenizer.save_pretrained(out)
        GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    fsync_tree(out)
    return sorted(p.name for p in out.iterdir())
