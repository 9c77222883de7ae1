"""Expert parallelism (``--expert_parallel_size N``) for our MoE family.

The world is a 2D device mesh ``(dp, ep)`` with ``dp x ep = world size``. Each MoE layer's expert
stacks become DTensors sharded on the expert dimension over ``ep`` (replicated over ``dp``): a rank
holds ``num_experts / ep`` experts of every layer, and tokens travel to them with ``all_to_all``
(:func:`accel_trainer.models.modeling_moe.experts_on_their_ranks`). Everything else stays with the
data-parallel engine as without EP: DDP replicates it, FSDP2 shards it over the world; both are told
to leave the experts alone.

Gradients: a rank's expert gradient holds the contributions of every token its ep group sent it.
:meth:`ExpertParallel.reduce_gradients` sums it over ``dp`` (the ranks with the same experts) and
divides by the world size, which is the data-parallel mean the engine applies to every other
gradient. :func:`clip_grad_norm_` takes the norm over every parameter however it is laid out.

Checkpoints need nothing more: DTensor parameters make the Checkpointer write DCP shards, whose
experts are stored whole by name, so a checkpoint resumes under any EP size, world size, or in one
process (and ``export``/``inspect`` read it as full tensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError

EXPERT_STACKS = ("gate_proj", "up_proj", "down_proj")


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that mix plain tensors and DTensors on
    different meshes (experts over ``ep``, FSDP2 shards over the world): each DTensor's squared norm
    is summed over the mesh dimensions it is sharded on, once per layout. Returns the total norm."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    by_layout: dict[tuple, list] = {}
    for g in grads:
        if isinstance(g, DTensor):
            shard_dims = tuple(i for i, pl in enumerate(g.placements) if pl.is_shard())
            key = (id(g.device_mesh), shard_dims)
            by_layout.setdefault(key, [g.device_mesh, shard_dims, []])[2].append(g.to_local())
        else:
            by_layout.setdefault(("plain",), [None, (), []])[2].append(g)
    device = grads[0].device if not isinstance(grads[0], DTensor) else grads[0].to_local().device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for mesh, shard_dims, tensors in by_layout.values():
        squares = torch.stack([t.detach().float().pow(2).sum() for t in tensors]).sum()
        for dim in shard_dims:  # a shard holds part of the tensor: add the other ranks' parts
            dist.all_reduce(squares, group=mesh.get_group(dim))
        total = total + squares
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for tensors in (entry[2] for entry in by_layout.values()):
        torch._foreach_mul_(tensors, coef.to(tensors[0].device))
    return norm


class ExpertParallel:
    """Shards a model's experts over an ``ep`` mesh dimension; see the module docstring.

    Args:
        size: ranks per expert-parallel group (``--expert_parallel_size``); divides the world size
            and every MoE layer's number of experts.
        device_type: ``"cpu"`` (gloo) or ``"cuda"``.
    """

    def __init__(self, size: int, device_type: str):
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        check_expert_parallel_size(size, world)
        self.size, self.world = size, world
        self.mesh = init_device_mesh(device_type, (world // size, size), mesh_dim_names=("dp", "ep"))
        self.group, self.dp_group = self.mesh.get_group("ep"), self.mesh.get_group("dp")
        self.params: dict[str, nn.Parameter] = {}

    # ----------------------------------------------------------------------------- the model
    def shard(self, model: nn.Module) -> int:
        """Make every MoE layer's expert stacks DTensors sharded over ``ep`` (each rank keeps its own
        slice of the weights it built; no communication). Returns the experts per rank.

        Raises:
            ConfigError: the model has no layers of our MoE family, or their experts do not divide.
        """
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        from .models import MoEFeedForward

        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEFeedForward)]
        if not layers:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ConfigError(f"--expert_parallel_size={self.size}: expert parallelism is built for our MoE family "
                              f"(accel_moe: --preset, or a folder of model_type accel_moe) and this model ({kind}) has "
                              "none of its layers; use --expert_parallel_size 1")
        experts = layers[0][1].num_experts
        if experts % self.size:
            raise ConfigError(f"--expert_parallel_size={self.size} must divide num_experts ({experts}); use one of "
                              f"{[n for n in range(1, self.world + 1) if self.world % n == 0 and experts % n == 0]}")
        for prefix, layer in layers:
            for stack in EXPERT_STACKS:
                full = getattr(layer, stack)
                local = distribute_tensor(full.detach(), self.mesh, [Replicate(), Shard(0)], src_data_rank=None)
                param = nn.Parameter(local, requires_grad=full.requires_grad)
                setattr(layer, stack, param)
                self.params[f"{prefix}.{stack}"] = param
            layer.expert_group = self.group
        return experts // self.size

    def leave_experts_to_us(self, accelerator, model: nn.Module) -> None:
        """Tell Accelerate's data-parallel engine (DDP or FSDP2) not to replicate, shard or average
        the experts; call before ``accelerator.prepare``.

        Raises:
            ConfigError: an engine EP does not run with (DeepSpeed, FSDP1, ...).
        """
        from accelerate.utils import DistributedType

        kind = accelerator.distributed_type
        if kind in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.MULTI_XPU):
            from torch.nn.parallel import DistributedDataParallel

            ids = {id(p) for p in self.params.values()}
            names = [n for n, p in model.named_parameters() if id(p) in ids]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        elif kind == DistributedType.FSDP and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
            plugin = accelerator.state.fsdp_plugin
            holder = nn.Module()  # Accelerate passes the parameters of its ignored_modules to fully_shard
            for i, param in enumerate(self.params.values()):
                holder.register_parameter(f"expert_stack_{i}", param)
            plugin.ignored_modules = [holder, *(plugin.ignored_modules or [])]
            # Its ram-efficient loading moves the whole model to meta and rebuilds it from rank 0's
            # full state, which would overwrite each rank's experts with rank 0's slice.
            if plugin.cpu_ram_efficient_loading:
                plugin.cpu_ram_efficient_loading = False
                accelerator.print("--expert_parallel_size: FSDP2's cpu_ram_efficient_loading is off for this run "
                                  "(every rank builds the model; the experts are then sliced per rank)")
        else:
            raise ConfigError(f"--expert_parallel_size={self.size} runs under DDP or FSDP2 (fsdp_version: 2); this "
                              f"launch uses {kind.value}: pick accelerate_configs/container_multigpu.yaml or a DDP "
                              "config, or --expert_parallel_size 1")

    # ------------------------------------------------------------------------------ gradients
    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """The experts' data-parallel mean: sum over ``dp`` (the replicas of the same experts), then
        divide by the world size. Call once per optimizer step, after the last backward."""
        grads = [p.grad.to_local() for p in self.params.values() if p.grad is not None]
        if not grads:
            return
        if self.world // self.size > 1:  # in place, one stack at a time: no second copy of the experts' gradients
            for g in grads:
                dist.all_reduce(g, group=self.dp_group)
        torch._foreach_div_(grads, float(self.world))

    def describe(self) -> str:
        per_rank = next(iter(self.params.values())).to_local().shape[0] if self.params else 0
        return (f"expert parallel: {self.size} ranks per expert group x {self.world // self.size} data-parallel "
                f"groups; {per_rank} experts of each MoE layer per rank; tokens move with all_to_all")


def check_expert_parallel_size(size: int, world: int) -> None:
    """Bad sizes, before any work (the model's experts are checked once it is built)."""
    if size < 1 or world % size:
        raise ConfigError(f"--expert_parallel_size={size} must divide the number of processes ({world}); use one of "
                          f"{[n for n in range(1, world + 1) if world % n == 0]}")


__all__ = ["EXPERT_STACKS", "ExpertParallel", "check_expert_parallel_size", "clip_grad_norm_"]
