"""The fast checkpoint files: streamed safetensors with checksums, optimizer state by name."""

import pytest
import torch
from safetensors.torch import load_file

from accel_trainer.checkpoint import optimizer_files
from accel_trainer.checkpoint.format import OPTIMIZER_TENSORS
from accel_trainer.checkpoint.checksums import hash_file
from accel_trainer.checkpoint.tensor_files import SafetensorsFile
from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.optim import OptimizerSettings, build_optimizers


def write_safetensors(path, tensors, metadata=None) -> str:
    """As the strategies write a file: stream it, then hash the same bytes from memory."""
    file = SafetensorsFile(tensors, metadata)
    file.write(path)
    return file.digest()


def test_streamed_file_is_standard_safetensors_and_digest_matches(tmp_path):
    tensors = {"w": torch.randn(3, 4), "step": torch.tensor(7.0), "ids": torch.arange(5),
               "h": torch.randn(2, 2).bfloat16(), "mask": torch.tensor([True, False]), "empty": torch.zeros(0, 3)}
    digest = write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"k": "v"})
    back = load_file(tmp_path / "t.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert digest == hash_file(tmp_path / "t.safetensors")


def test_unsupported_dtype_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match="tensor 'z' has dtype torch.complex64"):
        write_safetensors(tmp_path / "t.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})


def test_our_optimizer_container_round_trips_by_name(tmp_path):
    """Muon (3D experts) + AdamW, named by the optimizers' own param_names: same state back."""
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                                     num_experts_per_tok=2))
    opt = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    tensors, description = optimizer_files.split_state(opt.optimizers, names_by_id={})
    assert "model.layers.0.mlp.gate_proj::momentum_buffer" in tensors
    assert "lm_head.weight::exp_avg_sq" in tensors
    write_safetensors(tmp_path / OPTIMIZER_TENSORS, tensors)
    optimizer_files.write_description(tmp_path, description)
    fresh = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    optimizer_files.load_into(tmp_path, fresh.optimizers, names_by_id={})
    for name in ("muon", "adamw"):
        before, after = opt.optimizers[name].state_dict(), fresh.optimizers[name].state_dict()
        assert after["param_groups"] == before["param_groups"]
        for pid, state in before["state"].items():
            for key, value in state.items():
                assert torch.equal(after["state"][pid][key], value), (name, pid, key)
