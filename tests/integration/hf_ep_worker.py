"""Worker for expert parallelism of transformers MoE models under torchrun on CPU ranks (gloo).

For each family (a tiny model from a config, the same weights on every rank), each rank computes the
loss of its own batch twice: with the experts sharded over the ranks (EP=2: rows travel with
all_to_all) and with a whole copy of the model (EP=1, no communication). Losses must match, and so
must the gradients: a rank's expert shard holds every rank's tokens' contributions to its experts,
which is the whole copy's expert gradient summed over the ranks and sliced. Then one Muon+AdamW step
on each side must leave the same weights (Muon orthogonalises each rank's own experts).
Rank 0 prints ``family F loss_rel X grad_rel Y weight_rel Z``.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from accel_trainer.errors import ConfigError
from accel_trainer.models import HUGGING_FACE
from accel_trainer.models.hf_moe import use_engine
from accel_trainer.optim import OptimizerSettings, build_optimizers
from accel_trainer.parallel import ExpertParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from unit.test_hf_moe import FAMILIES, tiny  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
for model_type in sorted(FAMILIES):
    whole = tiny(model_type)  # seeded: the same weights on every rank
    assert use_engine(whole) is None
    sharded = copy.deepcopy(whole)
    plan = ExpertParallel(world, HUGGING_FACE, "cpu")
    plan.shard(sharded)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(100 + rank))
    a, b = whole(input_ids=ids, labels=ids), sharded(input_ids=ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    loss_rel = abs(a.loss.item() - b.loss.item()) / abs(a.loss.item())
    grad_rel = 0.0
    for (name, p), q in zip(whole.named_parameters(), sharded.parameters()):
        if p.grad is None:
            continue
        if type(q).__name__ == "DTensor":
            full = p.grad.clone()
            dist.all_reduce(full)  # every rank's tokens reach the rank of their expert
            per_rank = full.shape[0] // world
            expected, got = full[rank * per_rank:(rank + 1) * per_rank], q.grad.to_local()
        else:
            expected, got = p.grad, q.grad
        grad_rel = max(grad_rel, ((got - expected).abs().max() / (expected.abs().max() + 1e-12)).item())
    # One optimizer step each: the whole copy with its expert gradients summed over the ranks, as the
    # sharded one has them; Muon then orthogonalises each expert alone on both sides.
    for p, q in zip(whole.parameters(), sharded.parameters()):
        if p.grad is not None and type(q).__name__ == "DTensor":
            dist.all_reduce(p.grad)
    settings = OptimizerSettings(muon_lr=0.02, adamw_lr=1e-3)
    for model in (whole, sharded):
        opt = build_optimizers(model, settings)
        opt.step()
    weight_rel = 0.0
    for p, q in zip(whole.parameters(), sharded.parameters()):
        local = q.detach().to_local() if type(q).__name__ == "DTensor" else q.detach()
        per_rank = p.shape[0] // world if type(q).__name__ == "DTensor" else None
        expected = p.detach()[rank * per_rank:(rank + 1) * per_rank] if per_rank else p.detach()
        weight_rel = max(weight_rel, ((local - expected).abs().max() / (expected.abs().max() + 1e-12)).item())
    values = torch.tensor([loss_rel, grad_rel, weight_rel])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"family {model_type} loss_rel {values[0]:.3e} grad_rel {values[1]:.3e} weight_rel {values[2]:.3e}",
              flush=True)
# A layout the engine does not run: expert parallelism refuses it in one line.
gpt_oss = tiny("gpt_oss", intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
               sliding_window=8)
use_engine(gpt_oss)
try:
    ExpertParallel(world, HUGGING_FACE, "cpu").shard(gpt_oss)
except ConfigError as err:
    if rank == 0:
        print(f"refused: {err}", flush=True)
dist.destroy_process_group()
