"""Worker for the sharded-checkpoint tests, under torchrun on CPU ranks (gloo): a user's loop with an
FSDP2-sharded MoE (``fully_shard`` on each decoder layer), Muon+AdamW and the Checkpointer. Prints
``step N loss X`` on rank 0.

    worker.py OUT --steps 6 --save_every 2 [--async_save] [--resume] [--die_after_save K]
              [--upload_to URL --storage_options JSON] [--model accel_moe|qwen3_moe]

--model qwen3_moe: a transformers Qwen3-MoE built from a config (a Hub architecture) instead of ours.

Every rank trains on the same batch (seeded by the step), so the losses do not depend on the world
size and a resume on another world size can be compared with the uninterrupted run.
--die_after_save K: right after save(K) returns (its shards staged, written in the background),
every rank is killed with SIGKILL while the write is still in flight (the hashing is slowed down to
make sure of it), as a node failure would.
"""

import argparse
import json
import gc
import os
import signal
import time

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

from accel_trainer.checkpoint import Checkpointer
from accel_trainer.checkpoint import sharded
from accel_trainer.efficiency import decoder_layers
from accel_trainer.models import MoEConfig, MoEForCausalLM
from accel_trainer.optim import OptimizerSettings, build_optimizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loops import StepCounter  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=6)
parser.add_argument("--save_every", type=int, default=2)
parser.add_argument("--async_save", action="store_true")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--die_after_save", type=int, default=None)
parser.add_argument("--upload_to", default=None)
parser.add_argument("--storage_options", default=None)
parser.add_argument("--compression", default=None)
parser.add_argument("--model", default="accel_moe", choices=["accel_moe", "qwen3_moe"])
args = parser.parse_args()

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
shape = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
if args.model == "accel_moe":
    model = MoEForCausalLM(MoEConfig(**shape, shared_expert_intermediate_size=8))
else:
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **shape, intermediate_size=64,
                                                                  output_router_logits=True))
for layer in decoder_layers(model, model._no_split_modules):
    fully_shard(layer)
fully_shard(model)
container = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3))

loop = StepCounter()
ckpt = Checkpointer(accelerator, args.out, model=model, optimizer=container.optimizers, extra={"loop": loop},
                    async_save=args.async_save, upload_to=args.upload_to, compression=args.compression,
                    storage_options=json.loads(args.storage_options) if args.storage_options else None)
assert ckpt.sharded and ckpt.async_save == args.async_save
if args.die_after_save is not None:
    slow = sharded.ShardedState.own_digests

    def slow_digests(self, folder):  # slow storage: the commit cannot happen before the kill
        time.sleep(3)
        return slow(self, folder)

    sharded.ShardedState.own_digests = slow_digests
start = ckpt.resume("latest") if args.resume else 0
assert start == loop.step
for step in range(start + 1, args.steps + 1):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    container.step()
    container.zero_grad()
    loop.step = step
    accelerator.print(f"step {step} loss {loss.item():.8f}", flush=True)
    if step % args.save_every == 0:
        ckpt.save(step)
        if step == args.die_after_save:
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
ckpt.close()
del model, container, ckpt
gc.collect()
dist.barrier()
dist.destroy_process_group()
