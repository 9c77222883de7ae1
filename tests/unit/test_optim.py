import pytest
import torch

from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.optim import Muon, OptimizerSettings, build_optimizers, lr_multiplier, split_parameters


def tiny_model(shared=8):
    torch.manual_seed(0)
    return MoEForCausalLM(MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, moe_intermediate_size=16, num_experts=4,
                                    num_experts_per_tok=2, shared_expert_intermediate_size=shared))


def test_parameter_split_name_by_name():
    muon, adamw = split_parameters(tiny_model())
    muon_names, adamw_names = {n for n, _ in muon}, {n for n, _ in adamw}
    expected_muon = set()
    expected_adamw = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        p = f"model.layers.{i}."
        expected_muon |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        expected_muon |= {p + f"mlp.{x}_proj" for x in ("gate", "up", "down")}  # 3D stacked experts
        expected_muon |= {p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")}
        expected_adamw |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                           p + "mlp.router.weight"}
    assert muon_names == expected_muon
    assert adamw_names == expected_adamw
    model = tiny_model()
    assert len(muon) + len(adamw) == len(list(model.parameters()))


def _torch_muon_vs_ours(shape, steps=3):
    torch.manual_seed(1)
    w, g = torch.randn(*shape), torch.randn(*shape)
    theirs, ours = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt_t = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1)
    opt_o = Muon([ours], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    for i in range(steps):
        theirs.grad, ours.grad = g * (i + 1), g * (i + 1)
        opt_t.step()
        opt_o.step()
    return theirs, ours


@pytest.mark.parametrize("shape", [(8, 16), (16, 8), (12, 12)])
def test_muon_is_bitwise_torch_muon_on_2d(shape):
    theirs, ours = _torch_muon_vs_ours(shape)
    assert torch.equal(theirs, ours)


def test_muon_on_3d_experts_equals_torch_muon_per_expert():
    torch.manual_seed(2)
    w, g = torch.randn(3, 8, 16), torch.randn(3, 8, 16)
    stacked = torch.nn.Parameter(w.clone())
    opt = Muon([stacked], lr=0.02, ns_dtype=torch.bfloat16)
    stacked.grad = g.clone()
    opt.step()
    for e in range(3):
        single = torch.nn.Parameter(w[e].clone())
        ref = torch.optim.Muon([single], lr=0.02, weight_decay=0.0)
        single.grad = g[e].clone()
        ref.step()
        assert torch.equal(single, stacked[e]), f"expert {e}"


def test_muon_rejects_1d_with_the_parameter_name():
    with pytest.raises(ValueError, match="norm.weight has shape \\(4,\\)"):
        Muon([("norm.weight", torch.nn.Parameter(torch.ones(4)))])


def test_container_acts_as_one_optimizer_and_saves_by_name():
    model = tiny_model()
    opt = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3))
    assert isinstance(opt, torch.optim.Optimizer)
    assert set(opt.optimizers) == {"muon", "adamw"}
    assert len(opt.param_groups) == 2
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    sd = opt.state_dict()
    groups = {g["optimizer"]: g for g in sd["param_groups"]}
    assert set(groups) == {"muon", "adamw"}
    assert "model.layers.0.mlp.gate_proj" in groups["muon"]["param_names"]
    assert "lm_head.weight" in groups["adamw"]["param_names"]
    # Standard layout: one state entry per parameter, indices unique across optimizers.
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    assert sorted(ids) == list(range(len(list(model.parameters())))) == sorted(sd["state"])


def test_container_load_refuses_other_parameters_naming_them():
    opt_a = build_optimizers(tiny_model(shared=8), OptimizerSettings(0.02, 1e-3))
    opt_b = build_optimizers(tiny_model(shared=0), OptimizerSettings(0.02, 1e-3))
    with pytest.raises(ValueError, match="optimizer 'muon' group 0: parameters differ.*shared_expert"):
        opt_b.load_state_dict(opt_a.state_dict())


def test_container_state_round_trips_through_weights_only_torch_load(tmp_path):
    model = tiny_model()
    opt = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    fresh = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    fresh.load_state_dict(loaded)
    for name in ("muon", "adamw"):
        assert fresh.optimizers[name].state  # every optimizer got its state back
        for p in fresh.optimizers[name].state:
            for key, value in fresh.optimizers[name].state[p].items():
                assert torch.equal(value, opt.optimizers[name].state[p][key])


def test_lr_schedules():
    kw = dict(warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_multiplier(0, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, kind="cosine", **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, kind="cosine", **kw) == pytest.approx(0.55)
    assert lr_multiplier(110, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_multiplier(50, kind="wsd", decay_ratio=0.2, **kw) == 1.0
    assert lr_multiplier(100, kind="wsd", decay_ratio=0.2, **kw) == pytest.approx(0.55)
    assert lr_multiplier(110, kind="wsd", decay_ratio=0.2, **kw) == pytest.approx(0.1)
    assert lr_multiplier(500, kind="constant", **kw) == 1.0


def test_one_schedule_scales_each_optimizers_own_peak_lr():
    model = tiny_model()
    opt = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3))
    opt.set_lr(0.5)
    assert opt.lrs() == {"muon": pytest.approx(0.01), "adamw": pytest.approx(5e-4)}
    assert all(g["initial_lr"] in (0.02, 1e-3) for g in opt.param_groups)  # the peaks stay


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 grad scaling needs a CUDA GPU")
def test_fp16_scaler_updates_once_per_step_with_two_optimizers():
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="fp16")
    model = tiny_model()
    opt = build_optimizers(model, OptimizerSettings(0.02, 1e-3))
    model, prepared = accelerator.prepare(model, opt)
    calls = []
    original = accelerator.scaler.update
    accelerator.scaler.update = lambda *a, **k: (calls.append(1), original(*a, **k))
    ids = torch.randint(0, 64, (2, 8), device=accelerator.device)
    accelerator.backward(model(input_ids=ids, labels=ids).loss)
    prepared.step()
    assert len(calls) == 1


def test_container_follows_its_children_when_they_load_state():
    """torch's load_state_dict replaces an optimizer's group dicts; the container's view must follow,
    or LRs set through it would no longer reach the optimizers after a resume."""
    model = tiny_model()
    opt = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3))
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    saved = opt.optimizers["adamw"].state_dict()
    opt.optimizers["adamw"].load_state_dict(saved)
    opt.set_lr(0.5)
    assert opt.optimizers["adamw"].param_groups[0]["lr"] == pytest.approx(5e-4)
    assert all(p in opt.state for g in opt.optimizers["adamw"].param_groups for p in g["params"])


def test_optimizer_state_loads_by_name_across_a_weight_decay_regrouping(tmp_path):
    """A checkpoint of a run without AdamW weight decay (one group) resumes with --weight_decay (two
    groups: matrices decayed, norms not), and back: state by parameter name, this run's groups apply."""
    from safetensors.torch import save_file

    from accel_trainer.checkpoint.optimizer_files import load_into, split_state, write_description

    model = tiny_model()
    names = {id(p): n for n, p in model.named_parameters()}
    before = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=3e-3)).optimizers
    model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss.backward()
    for opt in before.values():
        opt.step()
    tensors, description = split_state(before, names)
    save_file(tensors, tmp_path / "optimizer.safetensors")
    write_description(tmp_path, description)
    after = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=3e-3, weight_decay=0.1)).optimizers
    load_into(tmp_path, after, names)
    assert [g["weight_decay"] for g in after["adamw"].param_groups] == [0.1, 0.0]
    old = {n: before["adamw"].state[p] for g in before["adamw"].param_groups for n, p in zip(g["param_names"],
                                                                                             g["params"])}
    new = {n: after["adamw"].state[p] for g in after["adamw"].param_groups for n, p in zip(g["param_names"],
                                                                                           g["params"])}
    assert old.keys() == new.keys()
    assert all(torch.equal(old[n][k], new[n][k]) for n in old for k in ("exp_avg", "exp_avg_sq", "step"))
