"""Worker for test_fsdp2.py, run under torchrun on CPU ranks (gloo); prints lines the test reads.

save DIR (2 ranks): Muon+AdamW on an FSDP2-sharded model (its layers checkpointed: recomputed in the
    backward) vs the same on a full copy; then model and
    optimizer state go through torch.distributed.checkpoint exactly as Accelerate's FSDP2
    SHARDED_STATE_DICT path does (get_model_state_dict/get_optimizer_state_dict + dcp.save).
load DIR (any other rank count): fresh sharded model+optimizer, dcp.load + set_*_state_dict, one more
    step; parameters must match the full-copy reference's next step.
"""

import gc
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

from accel_trainer.efficiency import enable_activation_checkpointing
from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.optim import OptimizerSettings, build_optimizers

mode, folder = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
config = MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=8)
settings = OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3)
ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))  # same batch on every rank


def sharded_model(activation_checkpointing: bool = False):
    torch.manual_seed(0)
    model = MoEForCausalLM(config)
    if activation_checkpointing:  # recomputed layers under FSDP2: the result must not change
        enable_activation_checkpointing(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def step(model, opt):
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def max_diff(sharded, reference_state):
    return max((p.full_tensor() - reference_state[n]).abs().max().item() for n, p in sharded.named_parameters())


def save():
    torch.manual_seed(0)
    reference = MoEForCausalLM(config)
    model = sharded_model(activation_checkpointing=True)
    opt_ref, opt = build_optimizers(reference, settings), build_optimizers(model, settings)
    for _ in range(3):
        step(reference, opt_ref)
        step(model, opt)
    print(f"rank{rank} max_param_diff {max_diff(model, reference.state_dict()):.3e}", flush=True)
    # Newton-Schulz work: each matrix once in all (gathered ones by one owner), the reference does all.
    print(f"rank{rank} ns_matrices {opt.optimizers['muon'].ns_matrices} of "
          f"{opt_ref.optimizers['muon'].ns_matrices}", flush=True)
    expert = model.model.layers[0].mlp.gate_proj
    momentum = opt.optimizers["muon"].state[expert]["momentum_buffer"]
    print(f"rank{rank} expert_shard {tuple(expert.to_local().shape)} momentum "
          f"{type(momentum).__name__} {tuple(momentum.to_local().shape)}", flush=True)
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)},
             checkpoint_id=folder)
    if rank == 0:
        torch.save(reference.state_dict(), folder + ".saved.pt")
    step(reference, opt_ref)
    if rank == 0:
        torch.save(reference.state_dict(), folder + ".next.pt")


def load():
    model = sharded_model()
    opt = build_optimizers(model, settings)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optimizer"])
    step(model, opt)
    reference_next = torch.load(folder + ".next.pt", weights_only=True)
    print(f"rank{rank} world{dist.get_world_size()} resumed_step_diff "
          f"{max_diff(model, reference_next):.3e}", flush=True)


save() if mode == "save" else load()
# The sharded model and optimizer went out of scope above; once collected, nothing but the registry
# holds the process group, so destroy_process_group really frees it and joins its gloo threads now,
# not during interpreter shutdown, where about 1 launch in 15 aborted after its work was done (exit -6;
# see accel_trainer/run.py). The barrier's own collective holds no Python tensors.
gc.collect()
dist.barrier()
dist.destroy_process_group()
