"""Worker for the expert-parallel tests under torchrun on CPU ranks (gloo): our MoE with its experts
sharded over ``--expert_parallel_size`` ranks and everything else sharded by Accelerate's own FSDP2
preparation (``fsdp2_prepare_model``, which Accelerate runs only on GPUs: here it is called with the
plugin a GPU launch would build), Muon+AdamW, the Checkpointer. Rank 0 prints ``step N loss X``.

    worker.py OUT --expert_parallel_size 2 --steps 4 [--save_at 2] [--resume] [--ranks_of_data 2]

Rank r trains on batch (step, r); one process with ``--ranks_of_data 2`` trains on both ranks'
batches at once, which is the same global batch (the losses and gradients are means over it).
"""

import argparse
import gc
from types import SimpleNamespace

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

from accel_trainer.checkpoint import Checkpointer
from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.optim import OptimizerSettings, assign_parameters, build_optimizers
from accel_trainer.parallel import ExpertParallel, clip_grad_norm_

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loops import StepCounter  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--expert_parallel_size", type=int, default=1)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--save_at", type=int, default=0)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--ranks_of_data", type=int, default=1)
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
world, rank = accelerator.num_processes, accelerator.process_index
torch.manual_seed(0)
model = MoEForCausalLM(MoEConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                                 shared_expert_intermediate_size=8))
experts = ExpertParallel(args.expert_parallel_size, "cpu") if args.expert_parallel_size > 1 else None
if experts is not None:
    experts.shard(model)
if world > 1:
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["DecoderLayer"], reshard_after_forward=True,
                                            cpu_ram_efficient_loading=True)
    engine = SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin),
                             mixed_precision="no", device=torch.device("cpu"), is_main_process=rank == 0,
                             print=accelerator.print, parallelism_config=None, torch_device_mesh=None)
    if experts is not None:
        experts.leave_experts_to_us(engine, model)
        assert not plugin.cpu_ram_efficient_loading  # it would rebuild every rank's experts from rank 0's
    model = fsdp2_prepare_model(engine, model)
container = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3), assign_parameters(model))

loop = StepCounter()
ckpt = Checkpointer(accelerator, args.out, model=model, optimizer=container.optimizers, extra={"loop": loop})
start = ckpt.resume("latest") if args.resume else 0
for step in range(start + 1, args.steps + 1):
    batches = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step * 100 + r))
               for r in ([rank] if args.ranks_of_data == 1 else range(args.ranks_of_data))]
    ids = torch.cat(batches)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if experts is not None:
        experts.reduce_gradients()
    norm = clip_grad_norm_(model.parameters(), 0.5)
    container.step()
    container.zero_grad()
    loop.step = step
    mean = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean)
        mean /= world
    accelerator.print(f"step {step} loss {mean.item():.8f}", flush=True)
    accelerator.print(f"step {step} grad_norm {norm.item():.8f}", flush=True)
    if step == args.save_at:
        ckpt.save(step)
muon = container.optimizers["muon"]
stacks = [p for g in muon.param_groups for p in g["params"] if p.ndim == 3]
local = {tuple(muon.state[p]["momentum_buffer"].to_local().shape) if experts else tuple(p.shape) for p in stacks}
line = f"rank {rank} muon orthogonalised {muon.ns_matrices} matrices; expert momentum per rank {sorted(local)}"
lines = [line]
if world > 1:  # printed by rank 0 alone: the ranks' output shares one pipe and lines could interleave
    lines = [None] * world
    dist.all_gather_object(lines, line)
accelerator.print("\n".join(lines), flush=True)
ckpt.close()
del model, container, ckpt
gc.collect()
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
