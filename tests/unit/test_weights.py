"""Weights-only loading: names, non-strict reports, legacy files, and refusing code in pickles."""

import os

import pytest
import torch
from safetensors.torch import save_file

from accel_trainer import CheckpointError, load_model_for_inference, load_weights
from accel_trainer.models import MoEConfig, MoEForCausalLM

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=8)


def model(**overrides):
    torch.manual_seed(0)
    return MoEForCausalLM(MoEConfig(**{**BASE, **overrides}))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_are_normalised(tmp_path, prefix):
    src = model()
    save_file({prefix + k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    dst = MoEForCausalLM(MoEConfig(**BASE))
    report = load_weights(dst, tmp_path / "w.safetensors")
    assert report.exact
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_load_into_wrapped_model(tmp_path):
    src = model()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    dst = MoEForCausalLM(MoEConfig(**BASE))
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = dst  # what torch.compile's wrapper exposes
    assert load_weights(compiled_like, tmp_path / "w.safetensors").exact


def test_larger_model_reports_missing_grouped_by_module(tmp_path):
    save_file(model().state_dict(), tmp_path / "w.safetensors")
    bigger = model(num_hidden_layers=3)
    fresh_layer2 = bigger.model.layers[2].mlp.gate_proj.detach().clone()
    report = load_weights(bigger, tmp_path / "w.safetensors")
    assert report.missing and all(k.startswith("model.layers.2.") for k in report.missing)
    assert not report.unexpected and not report.mismatched
    assert "missing in checkpoint (left as initialised)" in str(report)
    assert "model.layers.2: input_layernorm.weight" in str(report)
    assert torch.equal(bigger.model.layers[2].mlp.gate_proj, fresh_layer2)


def test_smaller_model_reports_unexpected(tmp_path):
    save_file(model(num_hidden_layers=3).state_dict(), tmp_path / "w.safetensors")
    report = load_weights(model(), tmp_path / "w.safetensors")
    assert report.unexpected and all(k.startswith("model.layers.2.") for k in report.unexpected)
    assert not report.missing


def test_shape_mismatch_is_skipped_not_a_crash_and_strict_lists_it(tmp_path):
    save_file(model(num_experts=8).state_dict(), tmp_path / "w.safetensors")
    target = model()
    report = load_weights(target, tmp_path / "w.safetensors")
    assert ("model.layers.0.mlp.gate_proj", (8, 16, 32), (4, 16, 32)) in report.mismatched
    assert "model.layers.0.self_attn.q_proj.weight" in report.loaded
    with pytest.raises(CheckpointError, match="(?s)strict weight loading failed.*shape-mismatched"):
        load_weights(target, tmp_path / "w.safetensors", strict=True)


def test_legacy_single_file_checkpoint_loads_for_inference_with_step(tmp_path):
    src = model()
    legacy = {"model_state_dict": {"module." + k: v for k, v in src.state_dict().items()},
              "optimizer_states": [{"state": {}, "param_groups": []}], "scheduler_states": [],
              "global_step": 500, "epoch": 3, "config": {**BASE, "d_model": 999}, "metrics": {"val_loss": 2.5}}
    torch.save(legacy, tmp_path / "checkpoint_latest.pt")
    loaded, config, step = load_model_for_inference(tmp_path / "checkpoint_latest.pt", device="cpu")
    assert step == 500 and config.num_experts == 4 and not loaded.training
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    torch.save({"model_state_dict": model().state_dict(), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: its pickle references \['posix.system'\]"):
        load_model_for_inference(tmp_path / "evil.pt", config=MoEConfig(**BASE), device="cpu")
    assert not marker.exists()


def test_strict_inference_load_of_other_architecture_fails_with_list(tmp_path):
    save_file(model(num_hidden_layers=3).state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="(?s)strict weight loading failed.*unexpected in checkpoint"):
        load_model_for_inference(tmp_path / "w.safetensors", config=MoEConfig(**BASE), strict=True, device="cpu")
    loaded, _, _ = load_model_for_inference(tmp_path / "w.safetensors", config=MoEConfig(**BASE), device="cpu")
    assert loaded.load_report.unexpected
