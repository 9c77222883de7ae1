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
    out, aux = layer(x)
    torch.testing.assert_close(out, reference_moe(layer, x), rtol=1e-5, atol=1e-6)
    assert aux.ndim == 0


def test_aux_loss_is_one_for_uniform_routing_and_grows_when_collapsed():
    torch.manual_seed(0)
    layer = MoEForCausalLM(tiny_config()).model.layers[0].mlp
    x = torch.randn(64, 32)
    with torch.no_grad():
        layer.router.weight.zero_()  # all probabilities equal -> balanced loss = 1 exactly
    _, aux_uniform = layer(x)
    assert aux_uniform.item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 10.0  # every token prefers expert 0
        x = x.abs()
    _, aux_collapsed = layer(x)
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
