"""The fast checkpoint files: streamed safetensors with checksums, optimizer state by name."""

import pytest
import torch
from safetensors.torch import load_file

from accel_trainer.checkpoint import optimizer_files
from accel_trainer.checkpoint.tensor_files import hash_file, write_safetensors
from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.optim import OptimizerSettings, build_optimizers


def test_streamed_file_is_standard_safetensors_and_digest_matches(tmp_path):
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7.0), "ids": torch.arange(5),
               "h": torch.randn(2, 2).bfloat16(), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    digest = write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"k": "v"})
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert digest == hash_file(tmp_path / "t.safetensors")


def test_unsupported_dtype_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match="t.safetensors: tensor 'z' has dtype torch.complex64"):
        write_safetensors(tmp_path / "t.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


def test_optimizer_state_round_trips_by_parameter_name(tmp_path):
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                                     num_experts_per_tok=2))
    opt = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    tensors, description = optimizer_files.split_state(opt.state_dict())
    assert "model.layers.0.mlp.gate_proj::momentum_buffer" in tensors
    assert "lm_head.weight::exp_avg_sq" in tensors
    write_safetensors(tmp_path / optimizer_files.TENSORS, tensors)
    optimizer_files.write_description(tmp_path, description)
    back = optimizer_files.read_state(tmp_path)
    original = opt.state_dict()
    assert back["param_groups"] == [{**g, "betas": list(g["betas"])} if "betas" in g else g
                                    for g in original["param_groups"]]
    for pid, state in original["state"].items():
        for key, value in state.items():
            assert torch.equal(back["state"][pid][key], value), (pid, key)
    fresh = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    fresh.load_state_dict(back)
