"""What makes the 18B run feasible, checked on CPU: activation checkpointing and regional
compilation change nothing but memory and speed (and no saved name), a non-finite loss never reaches
the weights, and the memory plan's activation estimate matches what a forward really keeps."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from accel_trainer.cli import main as cli_main
from accel_trainer.efficiency import compile_decoder_layers, enable_activation_checkpointing
from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.planning import activation_elements_per_token, plan
from accel_trainer.models.presets import PRESETS
from launching import TINY, read_jsonl

SMALL = dict(vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64)


def model_pair(**overrides):
    torch.manual_seed(0)
    a = MoEForCausalLM(MoEConfig(**{**SMALL, **overrides}))
    b = MoEForCausalLM(MoEConfig(**{**SMALL, **overrides}))
    b.load_state_dict(a.state_dict())
    return a, b


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    plain, checkpointed = model_pair()
    enable_activation_checkpointing(checkpointed)
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.layers)
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()  # nothing wrapped, names unchanged
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_checkpointing_works_in_a_fresh_process_where_the_kernel_probe_runs_inside_a_layer(dtype):
    """Found on the first GPU run: the grouped-matmul probe ran inside the first checkpointed layer and
    its saved tensors counted there, so every fresh --gradient_checkpointing run died at step 1."""
    from accel_trainer.models import modeling_moe

    modeling_moe._GROUPED_MM_WORKS.clear()  # as in a fresh process: the first forward probes the kernel
    _, checkpointed = model_pair()
    enable_activation_checkpointing(checkpointed)
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = checkpointed(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in checkpointed.model.layers.parameters())


def test_regional_compilation_matches_eager_and_keeps_the_names():
    eager, compiled = model_pair()
    assert compile_decoder_layers(compiled, backend="aot_eager") == 2
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, compiled)]
    for step in range(3):
        ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(step))
        losses = []
        for model, opt in zip((eager, compiled), opts):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert not [k for k in compiled.state_dict() if "_orig_mod" in k]


def test_a_non_finite_loss_skips_the_step_and_too_many_in_a_row_stop_with_the_last_good_state(
        recipe_module, tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    original = MoEForCausalLM.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 4:  # steps 4 and later: the loss is NaN
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoEForCausalLM, "forward", forward)
    code = recipe_module.main([*TINY, "--max_steps", "10", "--save_steps", "3", "--eval_steps", "0", "--logging_steps",
                               "1", "--max_nonfinite_steps", "2", "--output_dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 3
    assert "step 4: the loss or the gradient is not finite; the step is skipped" in out
    assert "training stopped by 2 steps in a row with a non-finite loss or gradient" in out
    root = tmp_path / "checkpoints"
    emergency = json.loads((root / "step-5" / "manifest.json").read_text())
    assert emergency["reasons"] == ["emergency"]
    # The skipped steps did not touch the weights: step 5's are step 3's.
    from safetensors.torch import load_file

    a, b = load_file(root / "step-3" / "model.safetensors"), load_file(root / "step-5" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[-1]["nonfinite_steps"] == 2 and records[-1]["loss"] is None  # NaN is written as null


@pytest.mark.parametrize("config", [
    SMALL,
    dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
         moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=256),
], ids=["tiny", "mid"])
def test_the_plans_activation_estimate_is_within_a_quarter_of_what_a_forward_keeps(config):
    """Measured: the bytes every tensor saved for the backward holds (fp32, CPU), parameters aside."""
    torch.manual_seed(0)
    cfg = MoEConfig(**config)
    model = MoEForCausalLM(cfg)
    batch, seq = 2, 128
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in kept.items() if ptr not in params)
    elements = activation_elements_per_token(cfg)
    estimate = 4 * batch * seq * (elements["layers"] + elements["head"])
    assert estimate == pytest.approx(measured, rel=0.25), (estimate, measured)


@pytest.mark.parametrize("preset", ["18b", "b200", "4090", "tiny"])
def test_plan_works_for_every_preset(preset, capsys):
    assert cli_main(["plan", "--preset", preset, "--num_gpus", "8", "--gpu_memory_gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "checkpoint" in out and ("fits" in out)


def test_the_18b_preset_plan_on_h100s():
    from recipes.moe18b import PRESETS

    config = MoEConfig(**PRESETS["18b"])
    with_ac = plan(config, 64, 80, 1, 4096, gradient_checkpointing=True)
    without = plan(config, 64, 80, 1, 4096, gradient_checkpointing=False)
    assert with_ac.fits and with_ac.activations < without.activations / 5
    assert not plan(config, 2, 80, 1, 4096, gradient_checkpointing=True).fits
    assert 140e9 < with_ac.checkpoint_bytes < 150e9  # fp32 weights + Muon momentum + AdamW moments


def test_expert_parallel_plans_the_experts_per_gpu_and_their_traffic(capsys):
    config = MoEConfig(**PRESETS["18b"])
    fsdp, ep = (plan(config, 16, 80, 1, 4096, expert_parallel_size=n) for n in (1, 8))
    experts = fsdp.counts["experts"]
    assert 16.5e9 < experts < 17.5e9  # 28 layers x 64 experts x 3 matrices of 2048 x 1536
    # FSDP2 gathers every expert twice and reduce-scatters fp32 gradients: ~2 x 2 B + 4 B per expert weight.
    assert fsdp.traffic["all_gather"] == pytest.approx(2 * 2 * experts * 15 / 16)
    # EP: 4 exchanges of 6 bf16 rows of 2048 per token in each of 28 layers, 7/8 of them leaving the GPU,
    # and the gradient all-reduce between the 2 copies of each GPU's 8 experts.
    assert ep.traffic["all_to_all"] == pytest.approx(4 * 4096 * 6 * 2048 * 2 * 28 * 7 / 8)
    assert ep.traffic["all_reduce"] == pytest.approx(2 * 4 * experts / 8 / 2)
    assert sum(ep.traffic.values()) < sum(fsdp.traffic.values()) / 5
    # Each GPU keeps its 8 experts' fp32 weights, gradients and momentum whole: more than FSDP2's shard.
    assert ep.optimizer - fsdp.optimizer == pytest.approx(4 * experts / 8 - 4 * experts / 16)
    assert cli_main(["plan", "--preset", "18b", "--num_gpus", "16", "--expert_parallel_size", "8"]) == 0
    out = capsys.readouterr().out
    assert "expert parallel 8: 8 of the 64 experts of each layer per GPU, 2 copies of the experts" in out
    assert "all-to-all" in out and "x less)" in out


@pytest.mark.parametrize("args, message", [
    (["--num_gpus", "8", "--expert_parallel_size", "3"], "--expert_parallel_size=3: must divide --num_gpus (8)"),
    (["--num_gpus", "8", "--expert_parallel_size", "0"], "--expert_parallel_size=0: must divide"),
])
def test_plan_refuses_an_expert_parallel_size_that_does_not_divide(args, message, capsys):
    assert cli_main(["plan", "--preset", "18b", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.fixture(scope="module", autouse=True)
def _repo_on_path():
    import sys

    from launching import REPO

    sys.path.insert(0, str(REPO))
    yield
    shutil.rmtree(REPO / "recipes" / "__pycache__", ignore_errors=True)
