import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from accel_trainer.models import MoEConfig, MoEForCausalLM, count_parameters
from accel_trainer.models.modeling_moe import MoEFeedForward


def tiny_config(**overrides):
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=8)
    return MoEConfig(**{**base, **overrides})


def reference_moe(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference: what the sorted/grouped dispatch must reproduce."""
    flat = x.reshape(-1, x.shape[-1])
    probs = layer.router(flat).float().softmax(-1)
    weights, experts = probs.topk(layer.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for w, e in zip(weights[t], experts[t]):
            h = F.silu(flat[t] @ layer.gate_proj[e].t()) * (flat[t] @ layer.up_proj[e].t())
            out[t] += w * (h @ layer.down_proj[e].t())
    if layer.shared_expert is not None:
        out += layer.shared_expert(flat)
    return out.reshape(x.shape)


def test_grouped_dispatch_matches_per_token_reference():
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config())
    layer = model.model.layers[0].mlp
    x = torch.randn(3, 7, 32)
    out, aux, _ = layer(x)
    torch.testing.assert_close(out, reference_moe(layer, x), rtol=1e-5, atol=1e-6)
    assert aux.ndim == 0


def test_the_layers_gathers_give_the_per_token_references_gradients():
    """Dispatch and combine are gathers with hand-written backwards: every gradient (inputs, router,
    expert stacks) must be autograd's through the per-token reference."""
    torch.manual_seed(0)
    layer = MoEForCausalLM(tiny_config()).model.layers[0].mlp
    x = torch.randn(3, 7, 32, requires_grad=True)
    target = torch.randn(3, 7, 32)
    grads = []
    for forward in (lambda: layer(x)[0], lambda: reference_moe(layer, x)):
        x.grad = None
        layer.zero_grad()
        ((forward() - target) ** 2).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_aux_loss_is_one_for_uniform_routing_and_grows_when_collapsed():
    torch.manual_seed(0)
    layer = MoEForCausalLM(tiny_config()).model.layers[0].mlp
    x = torch.randn(64, 32)
    with torch.no_grad():
        layer.router.weight.zero_()  # all probabilities equal -> balanced loss = 1 exactly
    _, aux_uniform, _ = layer(x)
    assert aux_uniform.item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 10.0  # every token prefers expert 0
        x = x.abs()
    _, aux_collapsed, _ = layer(x)
    assert aux_collapsed.item() > 1.5


def test_forward_returns_logits_loss_aux_and_loss_includes_aux():
    torch.manual_seed(0)
    config = tiny_config(router_aux_loss_coef=0.5)
    model = MoEForCausalLM(config)
    ids = torch.randint(0, 64, (2, 10))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 10, 64)
    assert torch.allclose(out.loss, out.lm_loss + 0.5 * out.aux_loss)
    out.loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad is not None  # aux loss reaches the router
    assert model.model.layers[1].mlp.gate_proj.grad.shape == (4, 16, 32)


def test_causal_masking_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 64, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])


def test_18b_preset_counts_18e9_on_meta_device_without_memory(recipe_module):
    config = MoEConfig(**recipe_module.PRESETS["18b"])
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    counts = count_parameters(model, config)
    assert abs(counts["total"] - 18e9) / 18e9 < 0.05, counts
    assert counts["active"] < counts["total"] / 4


@pytest.mark.parametrize("preset", ["tiny", "4090", "b200", "18b"])
def test_every_preset_builds_a_valid_config(recipe_module, preset):
    config = MoEConfig(**recipe_module.PRESETS[preset])
    assert config.num_experts_per_tok <= config.num_experts


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="num_experts_per_tok=5 cannot exceed num_experts=4"):
        tiny_config(num_experts_per_tok=5)
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        tiny_config(num_key_value_heads=3)


def test_save_pretrained_round_trips_through_auto_classes(tmp_path):
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "accel_moe"
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MoEConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_grouped_experts_equal_the_loop_in_outputs_and_gradients(dtype, tol):
    """F.grouped_mm over rows sorted by expert vs one matmul per expert, with experts that get no rows."""
    from accel_trainer.models.modeling_moe import experts_forward

    torch.manual_seed(0)
    gate, up, down = (torch.randn(4, 16, 8, dtype=dtype), torch.randn(4, 16, 8, dtype=dtype),
                      torch.randn(4, 8, 16, dtype=dtype))
    offsets = torch.tensor([0, 5, 5, 12], dtype=torch.int32)  # experts 0 and 2 get nothing
    rows = torch.randn(12, 8, dtype=dtype)
    results = []
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_() for t in (rows, gate, up, down)]
        out = experts_forward(leaves[0], offsets, *leaves[1:], grouped=grouped)
        out.sum().backward()  # a zero-stride gradient: what grouped_mm's CPU backward refuses unless handled
        results.append([out.detach().float()] + [t.grad.float() for t in leaves])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_the_moe_layer_makes_no_host_sync_on_its_grouped_path(monkeypatch):
    """No .tolist()/.item() in the forward or backward where grouped_mm runs."""
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config())
    ids = torch.randint(0, 64, (2, 9))

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the MoE layer")

    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    monkeypatch.setattr(torch.Tensor, "item", refuse)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.expert_load.shape == (2, 4) and int(out.expert_load.sum(dim=1)[0]) == 2 * 9 * 2


def test_checkpoint_names_and_stacked_expert_shapes_are_unchanged():
    """Old checkpoints load: the same tensor names and 3D expert shapes as before grouped GEMM."""
    model = MoEForCausalLM(tiny_config(num_hidden_layers=1))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "model.embed_tokens.weight": (64, 32), "model.layers.0.input_layernorm.weight": (32,),
        "model.layers.0.self_attn.q_proj.weight": (32, 32), "model.layers.0.self_attn.k_proj.weight": (16, 32),
        "model.layers.0.self_attn.v_proj.weight": (16, 32), "model.layers.0.self_attn.o_proj.weight": (32, 32),
        "model.layers.0.post_attention_layernorm.weight": (32,), "model.layers.0.mlp.router.weight": (4, 32),
        "model.layers.0.mlp.gate_proj": (4, 16, 32), "model.layers.0.mlp.up_proj": (4, 16, 32),
        "model.layers.0.mlp.down_proj": (4, 32, 16), "model.layers.0.mlp.shared_expert.gate_proj.weight": (8, 32),
        "model.layers.0.mlp.shared_expert.up_proj.weight": (8, 32),
        "model.layers.0.mlp.shared_expert.down_proj.weight": (32, 8), "model.norm.weight": (32,),
        "lm_head.weight": (64, 32)}


def _greedy_without_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_with_a_kv_cache_equals_recomputing_everything():
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 64, (2, 7))  # 0 is the pad id: generate would mask it
    gen = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    out = gen.sequences
    with torch.no_grad():  # each step's logits (from the cache) are those of the whole prefix recomputed
        for i, logits in enumerate(gen.logits):
            torch.testing.assert_close(logits, model(input_ids=out[:, : 7 + i]).logits[:, -1], rtol=1e-4, atol=1e-5)
    assert torch.equal(out, _greedy_without_cache(model, ids, 12))
    # The cache is used: a step after a 7-token prompt sees one new token and 8 cached positions.
    step = model(input_ids=ids, use_cache=True)
    cache = step.cache if "cache" in step else step.past_key_values
    assert cache.get_seq_length() == 7
    nxt = model(input_ids=out[:, 7:8], cache=cache) if "cache" in step else model(input_ids=out[:, 7:8],
                                                                                 past_key_values=cache)
    torch.testing.assert_close(nxt.logits[:, -1], model(input_ids=out[:, :8]).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config()).eval()
    short, long = torch.randint(1, 64, (1, 4)), torch.randint(1, 64, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
    mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    for row, prompt in ((0, short), (1, long)):
        alone = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(out[row, -alone.shape[1]:], alone[0]), row


def test_generate_stops_at_eos_and_pads_the_finished_rows():
    torch.manual_seed(0)
    model = MoEForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 60, (1, 5))
    eos = int(_greedy_without_cache(model, ids, 3)[0, 6])  # the 2nd generated token, taken as EOS
    out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=63)
    assert out.shape[1] <= 5 + 2 and int(out[0, -1]) == eos
