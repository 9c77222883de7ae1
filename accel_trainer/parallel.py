"""Parallelism: one owner of the device mesh, and the plans the trainer calls without branching.

:class:`ParallelDims` (torchtitan's idea) is built once from the flags and Accelerate's
``ParallelismConfig`` and owns the mesh: every dimension is a named sub-mesh (``dp``, ``ep``; ``tp`` and
``cp`` are slots, refused in one line until they are built). :meth:`ParallelDims.plan` returns the
:class:`ParallelPlan` whose hooks the trainer calls: ``apply`` (before the optimizers see the model),
``before_prepare`` (tell Accelerate's engine what not to wrap), ``reduce_gradients`` and
``clip_grad_norm_``. Plain data parallelism is :class:`DataParallel` (Accelerate does everything);
a new parallelism is a new plan and a dimension here.

Expert parallelism (``--expert_parallel_size N``, for families that support ``ep``): the world is a
2D device mesh ``(dp, ep)`` with ``dp x ep = world size``. Each MoE layer's expert
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

#: Mesh dimensions in order, outermost first; tp and cp are slots (size 1) until they are built.
DIMENSIONS = ("dp", "ep", "cp", "tp")


class ParallelDims:
    """The sizes of every parallel dimension of a run, and the one device mesh over them.

    Args:
        world: processes in the run.
        ep: ``--expert_parallel_size``, ranks sharing one copy of the experts.
        tp, cp: tensor and context parallel sizes (from Accelerate's ``ParallelismConfig``); not
            built yet, so anything but 1 is refused in one line.

    Raises:
        ConfigError: a size that does not divide the world, or a dimension not built.
    """

    def __init__(self, world: int, ep: int = 1, tp: int = 1, cp: int = 1, family=None):
        self.ep = ep
        if family is not None:  # the model first: a size is moot for a family without the dimension
            self.check_family(family)
        for flag, size in (("--expert_parallel_size", ep), ("tp_size", tp), ("cp_size", cp)):
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"{flag}={size!r}: must be a whole number >= 1")
        for name, size in (("tp_size", tp), ("cp_size", cp)):
            if size != 1:
                raise ConfigError(f"{name}={size} (Accelerate's parallelism_config): tensor and context parallelism "
                                  "are not built in accel_trainer yet; set it to 1 (FSDP2 and "
                                  "--expert_parallel_size are)")
        if world % (ep * tp * cp):
            raise ConfigError(f"--expert_parallel_size={ep} must divide the number of processes ({world}); use one "
                              f"of {[n for n in range(1, world + 1) if world % n == 0]}")
        self.world, self.ep, self.tp, self.cp = world, ep, tp, cp
        self.dp = world // (ep * tp * cp)
        self._mesh = None

    @classmethod
    def from_run(cls, expert_parallel_size: int, world: int, parallelism_config=None, family=None) -> "ParallelDims":
        """From the flags and Accelerate's ``ParallelismConfig`` (``accelerator.parallelism_config``),
        checked against the model's ``family``."""
        tp = getattr(parallelism_config, "tp_size", 1) or 1
        cp = getattr(parallelism_config, "cp_size", 1) or 1
        return cls(world, ep=expert_parallel_size, tp=tp, cp=cp, family=family)

    def sizes(self) -> dict[str, int]:
        return {"dp": self.dp, "ep": self.ep, "cp": self.cp, "tp": self.tp}

    def check_family(self, family) -> None:
        """Refuse a dimension the model's family does not support, before any work.

        Raises:
            ConfigError: naming the flag, the family and what to do.
        """
        if isinstance(self.ep, int) and self.ep > 1 and not family.supports("ep"):
            with_ep = "our MoE family and transformers' MoE models"
            raise ConfigError(f"--expert_parallel_size={self.ep}: expert parallelism is built for {with_ep}, not "
                              f"the {family.name} family; use --expert_parallel_size 1 (docs/cluster.md says why)")

    def mesh(self, device_type: str):
        """The device mesh over the dimensions larger than 1 (``dp`` always), built once."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            names = [n for n in DIMENSIONS if n == "dp" or self.sizes()[n] > 1]
            self._mesh = init_device_mesh(device_type, tuple(self.sizes()[n] for n in names),
                                          mesh_dim_names=tuple(names))
        return self._mesh

    def plan(self, family, device_type: str) -> "ParallelPlan":
        """The plan this run's trainer calls: expert parallelism over the ``ep`` sub-mesh, or plain data
        parallelism (Accelerate's DDP/FSDP2 do it all)."""
        if self.ep > 1:
            return ExpertParallel(self, family, device_type)
        return DataParallel()


class ParallelPlan:
    """The hooks the trainer calls, whatever parallelism is on."""

    def apply(self, model: nn.Module) -> None:
        """Before the optimizers are built: lay the model out (e.g. shard its experts)."""

    def before_prepare(self, accelerator, model: nn.Module) -> None:
        """Before ``accelerator.prepare``: tell the data-parallel engine what to leave alone."""

    def reduce_gradients(self) -> None:
        """After the last backward of a step: the gradients the engine does not reduce."""

    def clip_grad_norm_(self, accelerator, parameters, max_norm: float):
        """Clip every gradient to one total norm; returns the norm before clipping."""
        return accelerator.clip_grad_norm_(parameters, max_norm)

    def describe(self) -> str | None:
        return None


class DataParallel(ParallelPlan):
    """Plain data parallelism (one process, DDP, FSDP2): Accelerate's engine does everything."""


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


class ExpertParallel(ParallelPlan):
    """Shards a model's experts over the ``ep`` sub-mesh of :class:`ParallelDims`; see the module docstring.

    Args:
        dims: the run's :class:`ParallelDims` (``ep`` > 1), or an int ``--expert_parallel_size``
            (the world is then the process group's).
        family: the model's family (its MoE layers and expert stacks); None: our MoE family.
        device_type: ``"cpu"`` (gloo) or ``"cuda"``.
    """

    def __init__(self, dims: "ParallelDims | int", family=None, device_type: str = "cpu"):
        if isinstance(family, str):  # ExpertParallel(size, device_type), as older callers wrote it
            family, device_type = None, family
        if not isinstance(dims, ParallelDims):
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            dims = ParallelDims(world, ep=dims)
        if family is None:
            from .models import ACCEL_MOE as family
        dims.check_family(family)
        self.dims, self.family = dims, family
        self.size, self.world = dims.ep, dims.world
        self.mesh = dims.mesh(device_type)
        self.group, self.dp_group = self.mesh.get_group("ep"), self.mesh.get_group("dp")
        self.params: dict[str, nn.Parameter] = {}

    # ----------------------------------------------------------------------------- the model
    def apply(self, model: nn.Module) -> None:
        self.shard(model)

    def shard(self, model: nn.Module) -> int:
        """Make every MoE layer's expert stacks DTensors sharded over ``ep`` (each rank keeps its own
        slice of the weights it built; no communication). Returns the experts per rank.

        Raises:
            ConfigError: the model has no MoE layers of its family, or their experts do not divide.
        """
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        layers = self.family.expert_layers(model)
        if not layers:
            kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise ConfigError(f"--expert_parallel_size={self.size}: this model ({kind}) has no MoE layers on "
                              "accel_trainer's MoE engine to shard (none, or experts of a layout it does not run, "
                              "said above); use --expert_parallel_size 1")
        experts = layers[0][1].num_experts
        if experts % self.size:
            raise ConfigError(f"--expert_parallel_size={self.size} must divide num_experts ({experts}); use one of "
                              f"{[n for n in range(1, self.world + 1) if self.world % n == 0 and experts % n == 0]}")
        for prefix, layer in layers:
            for stack in self.family.expert_stacks:
                full = getattr(layer, stack)
                local = distribute_tensor(full.detach(), self.mesh, [Replicate(), Shard(0)], src_data_rank=None)
                param = nn.Parameter(local, requires_grad=full.requires_grad)
                setattr(layer, stack, param)
                self.params[f"{prefix}.{stack}"] = param
            layer.expert_group = self.group
        return experts // self.size

    def before_prepare(self, accelerator, model: nn.Module) -> None:
        self.leave_experts_to_us(accelerator, model)

    def clip_grad_norm_(self, accelerator, parameters, max_norm: float):
        return clip_grad_norm_(parameters, max_norm)  # mixed layouts: one norm over all

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


__all__ = ["DIMENSIONS", "DataParallel", "ExpertParallel", "ParallelDims", "ParallelPlan", "clip_grad_norm_"]
