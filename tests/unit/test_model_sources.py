"""Every way in to the trainer, in-process: the optimizer rule on transformers architectures and on a
module of your own, Muon per part of a fused matrix, and bad input as one line (exit 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoConfig

from accel_trainer.models import build_on_meta
from accel_trainer.optim import Muon, assign_parameters, zeropower_via_newtonschulz
from launching import REPO


def by_name(model, **kwargs):
    return {a.name: a for a in assign_parameters(model, **kwargs)}


def test_every_expert_matrix_goes_to_muon_and_no_embedding_norm_or_router():
    config = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    model = build_on_meta(config)
    found = by_name(model)
    params = dict(model.named_parameters())
    for name, a in found.items():
        p = params[name]
        if p.ndim == 3:
            assert a.optimizer == "muon", name
        if p.ndim < 2 or "embed" in name or "norm" in name or name.endswith("mlp.gate.weight") or "lm_head" in name:
            assert a.optimizer == "adamw", name
    fused = found["model.layers.0.mlp.experts.gate_up_proj"]
    assert fused.layout.parts == (-2, (16, 16)) and fused.reason == "expert stack, fused: per part"
    assert found["model.layers.0.mlp.gate.weight"].reason == "router"


def test_gpt2_fused_qkv_is_split_in_three_along_its_output_dimension():
    model = build_on_meta(AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16))
    c_attn = by_name(model)["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.optimizer == "muon" and c_attn.layout.in_out and c_attn.layout.parts == (-1, (32, 32, 32))


def test_patterns_override_the_rule_and_muon_refuses_vectors():
    model = build_on_meta(AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    found = by_name(model, adamw_patterns=[r"mlp\."], muon_patterns=["embed_tokens"])
    assert found["model.layers.0.mlp.up_proj.weight"].optimizer == "adamw"
    assert found["model.embed_tokens.weight"].optimizer == "muon"
    with pytest.raises(ValueError, match="--muon_params: model.norm.weight has shape \\(32,\\); Muon takes matrices"):
        assign_parameters(model, muon_patterns=[r"^model\.norm"])


def test_a_fused_matrix_is_orthogonalised_part_by_part():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.zeros(2, 12, 8))  # two experts, gate and up of 6 rows each
    grad = torch.randn(2, 12, 8)
    weight.grad = grad.clone()
    Muon([{"params": [weight], "parts": [-2, [6, 6]]}], lr=0.1, momentum=0.0, nesterov=False).step()
    expected = torch.cat([zeropower_via_newtonschulz(half) * math.sqrt(max(1.0, 6 / 8)) for half in grad.split(6, -2)],
                         -2)
    assert torch.allclose(weight.detach(), -0.1 * expected)


def test_a_module_of_your_own_gets_the_rule_too():
    import sys

    sys.path.insert(0, str(REPO / "examples"))
    try:
        from custom_model import GPTConfig, TinyGPT
    finally:
        sys.path.pop(0)
    found = by_name(TinyGPT(GPTConfig(n_layer=1)))
    assert found["head.weight"].reason == "output head" and found["tok.weight"].optimizer == "adamw"
    assert found["blocks.0.attn.in_proj_weight"].layout.parts == (-2, (256, 256, 256))
    assert found["blocks.0.mlp.0.weight"].optimizer == "muon"


@pytest.mark.parametrize("args, message", [
    (["--model_type", "lama"], "--model_type='lama': not a transformers architecture; did you mean llama"),
    (["--model_type", "llama", "--config_overrides", "hiden_size=32"],
     "--config_overrides: llama configs have no key 'hiden_size'; did you mean hidden_size"),
    (["--model_type", "llama", "--preset", "tiny"], "--preset and --model_type: give one"),
    (["--config_overrides", "hidden_size=32"], "--config_overrides: changes a Hugging Face config"),
    (["--model_name_or_path", "./no/such/folder"], "--model_name_or_path='./no/such/folder': no such folder"),
])
def test_bad_model_input_is_one_line(args, message, tmp_path, capsys):
    from accel_trainer.run import main

    try:  # flags that contradict each other stop in the parser (SystemExit), the rest in the run
        code = main([*args, "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "data").exists()  # before any data work


def test_a_folder_without_config_and_a_hub_name_offline_fail_in_seconds(tmp_path, capsys, monkeypatch):
    import time

    from accel_trainer import hub
    from accel_trainer.run import main

    (tmp_path / "empty").mkdir()
    assert main(["--model_name_or_path", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "a")]) == 2
    assert "the folder has no config.json" in capsys.readouterr().err
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)  # what no network gives
    began = time.perf_counter()
    assert main(["--model_name_or_path", "Qwen/Qwen3-30B-A3B", "--tokenizer_name", "byte",
                 "--output_dir", str(tmp_path / "b")]) == 2
    assert "--model_name_or_path='Qwen/Qwen3-30B-A3B': the Hugging Face Hub is not reachable" in capsys.readouterr().err
    assert time.perf_counter() - began < 10


def test_a_forward_without_a_loss_is_one_line(tmp_path, capsys):
    from accel_trainer.run import main

    class NoLoss(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.embed = nn.Embedding(config["vocab_size"], 8)

        def forward(self, input_ids, labels=None):
            return self.embed(input_ids)  # logits-like, no loss

    code = main(["--output_dir", str(tmp_path), "--report_to", "none", "--max_steps", "1", "--max_corpus_bytes",
                 "20000", "--block_size", "16", "--per_device_train_batch_size", "2", "--disable_tqdm"],
                model_factory=NoLoss, model_config={"vocab_size": 320})
    err = capsys.readouterr().err
    assert code == 2 and "returned a tensor of shape (2, 16, 8), not a loss" in err and "Traceback" not in err
