"""Hugging Face MoE models on our MoE engine (issue #29): transformers' own router, shared experts
and balance loss, our dispatch and grouped GEMMs: the same loss and gradients as the model's own
eager experts, per family; a layout the engine does not run keeps transformers' kernel, said in one
line; the recipe picks the engine by itself."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from accel_trainer.models.hf_moe import ENGINE, engine_layers, experts_modules, routed_expert_parameters, use_engine
from accel_trainer.run import main as run_main

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=16, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                      head_dim=8, norm_topk_prob=True),
    "mixtral": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2),
    # sigmoid router with a bias and group-limited top-k, a shared expert, a dense first layer
    "deepseek_v3": dict(moe_intermediate_size=16, intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                        kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8),
    "qwen2_moe": dict(moe_intermediate_size=16, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=16),
}


def tiny(model_type: str, **extra):
    config = AutoConfig.for_model(model_type, **COMMON, **FAMILIES.get(model_type, {}), **extra)
    config.output_router_logits = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # weights far from their init, so the routing is far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.set_experts_implementation("eager")
    return model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_our_engine_computes_what_the_models_own_experts_compute(model_type):
    theirs = tiny(model_type)
    ours = copy.deepcopy(theirs)
    assert use_engine(ours) is None and ours.config._experts_implementation == ENGINE
    assert len(engine_layers(ours)) == len(experts_modules(ours)) > 0
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    a, b = theirs(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)  # balance loss included (router logits)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(theirs.named_parameters(), ours.parameters()):
        if p.grad is not None:
            assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6), name
    # names and layouts are the model's own: the checkpoint and export stay its own
    assert theirs.state_dict().keys() == ours.state_dict().keys()
    loads = [m.expert_load for _, m in engine_layers(ours)]
    assert all(int(load.sum()) == 2 * 16 * ours.config.num_experts_per_tok for load in loads)  # telemetry


def test_a_layout_the_engine_does_not_run_keeps_transformers_kernel_in_one_line():
    model = tiny("gpt_oss", intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                 sliding_window=8)
    why = use_engine(model)
    assert why.startswith("experts stay on transformers' kernel (GptOssExperts has transposed stacks")
    assert "no expert parallelism" in why and "\n" not in why
    assert model.config._experts_implementation == "eager" and engine_layers(model) == []


def test_planning_counts_the_routed_experts_of_a_transformers_config():
    config = AutoConfig.for_model("qwen3_moe", **COMMON, **FAMILIES["qwen3_moe"])
    total, largest = routed_expert_parameters(config)
    per_layer = 8 * (2 * 16 * 32 + 32 * 16)
    assert (total, largest) == (2 * per_layer, per_layer)


def test_the_recipe_runs_a_transformers_moe_on_the_engine(capsys, tmp_path):
    code = run_main(["--model_type", "qwen3_moe", "--config_overrides",
                     "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=1,"
                     "intermediate_size=32,moe_intermediate_size=16,num_experts=4,num_experts_per_tok=2",
                     "--max_steps", "2", "--output_dir", str(tmp_path), "--report_to", "none",
                     "--max_corpus_bytes", "20000", "--block_size", "32", "--per_device_train_batch_size", "2",
                     "--eval_steps", "0", "--save_steps", "0", "--disable_tqdm"])
    out = capsys.readouterr().out
    assert code == 0 and "run as accel_trainer" in out


def test_plan_takes_a_transformers_moe_with_expert_parallelism(tmp_path, capsys):
    from accel_trainer.cli import main as cli_main

    AutoConfig.for_model("qwen3_moe", **COMMON, **FAMILIES["qwen3_moe"]).save_pretrained(tmp_path)
    assert cli_main(["plan", "--config", str(tmp_path / "config.json"), "--expert_parallel_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "expert parallel 2: 4 of the 8 experts of each layer per GPU" in out and "FSDP2+EP=2" in out
