"""Hugging Face MoE models on our MoE engine, through transformers' own door for it.

transformers (v5) stores a MoE layer's experts as 3D stacks (``gate_up_proj`` [E, 2F, D],
``down_proj`` [E, D, F]) in a class decorated with ``use_experts_implementation``, whose forward
takes the router's choices ``(hidden_states, top_k_index, top_k_weights)`` and dispatches to the
function registered under ``config._experts_implementation`` (``eager``, ``grouped_mm``, ...). We
register ours there as ``accel_trainer``: the model keeps its own router (softmax or sigmoid, its
bias and group rules, top-k normalisation), its shared experts and its balance loss, and its
parameter names and layouts; only the experts' computation is ours:

- dispatch by gathers (tokens sorted by expert with one argsort; the backward is a gather too),
- one grouped GEMM per projection (``F.grouped_mm``), expert offsets on the device: no host sync,
- expert parallelism: under ``--expert_parallel_size`` the stacks are DTensors sharded on the expert
  dimension and the rows travel to their expert's rank with ``all_to_all`` (the same code as our MoE),
- telemetry: each layer keeps the slots routed to each expert (``expert_load``).

Layouts other than the default (transposed stacks, biases, interleaved gate/up, no gate, a norm
after each expert: GPT-OSS and a few others) stay on transformers' own kernels, said in one line.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_moe import (_GROUPED_MM_WORKS, _ContiguousGrad, _Rows, experts_on_their_ranks, grouped_mm_works,
                           sort_by_expert)

#: The name of our experts function in transformers' ``ExpertsInterface`` (``--experts_implementation``).
ENGINE = "accel_trainer"
#: Parameter names of the expert stacks expert parallelism shards.
EXPERT_STACKS = ("gate_up_proj", "down_proj")


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` of the transformers experts modules of ``model`` (the classes decorated
    with ``use_experts_implementation``: 3D expert stacks, the router's choices as input)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "is_transposed") and hasattr(m, "has_gate") and isinstance(getattr(m, "down_proj", None),
                                                                                     nn.Parameter)]


def layout_problem(module: nn.Module) -> str | None:
    """Why our engine does not run this experts module (None: it does)."""
    differs = [what for what, yes in (("transposed stacks", module.is_transposed),
                                       ("interleaved gate/up", not getattr(module, "is_concatenated", True)),
                                       ("biases", module.has_bias), ("no gate", not module.has_gate),
                                       ("a norm after each expert", getattr(module, "has_post_expert_norm", False)))
              if yes]
    if differs:
        return f"{type(module).__name__} has {', '.join(differs)}"
    return None


def gated_experts(x: torch.Tensor, offsets: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  grouped: bool = True, act=F.silu) -> torch.Tensor:
    """Each expert's gated MLP on its rows of ``x`` (rows sorted by expert; ``offsets[e]`` = end of
    expert ``e``'s rows, int32), with transformers' fused stacks: ``gate_up`` [E, 2F, D] (gate rows,
    then up rows) and ``down`` [E, D, F]. Grouped: two grouped GEMMs, no host sync; not grouped: one
    matmul per expert (the row counts go to the host once)."""
    if grouped:
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists: cast as it would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        gate, up = _ContiguousGrad.apply(F.grouped_mm(x, gate_up.transpose(-2, -1), offs=offsets)).chunk(2, dim=-1)
        return _ContiguousGrad.apply(F.grouped_mm(act(gate) * up, down.transpose(-2, -1), offs=offsets))
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()  # the fallback's one sync
    outputs = []
    for e, rows in enumerate(x.split(sizes)):
        if rows.shape[0]:
            gate, up = (rows @ gate_up[e].t()).chunk(2, dim=-1)
            outputs.append((act(gate) * up) @ down[e].t())
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


_gated_experts_outside_compile = torch.compiler.disable(gated_experts)


def _kernel(x: torch.Tensor):
    """The experts function and whether it is grouped, as :meth:`MoEFeedForward.experts_kernel` decides."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if not torch.compiler.is_compiling():
        return gated_experts, grouped_mm_works(x.device, dtype)
    grouped = _GROUPED_MM_WORKS.get((x.device.type, dtype), True)
    return (gated_experts if dtype == torch.bfloat16 or not grouped else _gated_experts_outside_compile), grouped


def engine_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Our experts computation for a transformers experts module (``self``), registered as
    :data:`ENGINE`: ``hidden_states`` [tokens, D], the router's ``top_k_index``/``top_k_weights``
    [tokens, k] -> [tokens, D], each token's experts weighted and summed."""
    num_tokens, k = top_k_index.shape
    order, position, counts, offsets = sort_by_expert(top_k_index, self.num_experts)
    kernel, grouped = _kernel(hidden_states)
    rows = _Rows.apply(hidden_states, order // k, position, k)  # one gather in
    group = getattr(self, "expert_group", None)
    if group is None:
        routed = kernel(rows, offsets, self.gate_up_proj, self.down_proj, grouped=grouped, act=self.act_fn)
    else:
        routed = experts_on_their_ranks(rows, counts, (self.gate_up_proj, self.down_proj), group,
                                        partial(gated_experts, act=self.act_fn), grouped)
    slots = _Rows.apply(routed, position, order, 1).view(num_tokens, k, -1)  # one gather out
    out = torch.bmm(top_k_weights.to(slots.dtype).unsqueeze(1), slots).squeeze(1)
    self.expert_load = counts.detach()  # telemetry reads it at logging steps
    return out.to(hidden_states.dtype)


def register_engine() -> None:
    """Make :data:`ENGINE` a valid ``experts_implementation`` for every transformers model."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(ENGINE, engine_experts_forward)


def use_engine(model: nn.Module) -> str | None:
    """Run ``model``'s experts on our engine when every experts module has a layout it runs.

    Returns:
        None when switched (or the model has no experts modules), else the one line that says why the
        model keeps transformers' own kernel.
    """
    modules = experts_modules(model)
    if not modules:
        return None
    problems = {problem for _, m in modules if (problem := layout_problem(m))}
    if problems:
        return (f"experts stay on transformers' kernel ({'; '.join(sorted(problems))}: not a layout accel_trainer's "
                "MoE engine runs); no expert parallelism for this model")
    register_engine()
    model.set_experts_implementation(ENGINE)
    return None


def engine_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules that run on our engine (what expert parallelism shards)."""
    modules = experts_modules(model)
    if not modules or any(layout_problem(m) for _, m in modules):
        return []
    return [(name, m) for name, m in modules if m.config._experts_implementation == ENGINE]


def routed_expert_parameters(config) -> tuple[int, int]:
    """(routed-expert parameters of all layers, of the largest layer) of the transformers model
    ``config`` describes, counted on a model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = [sum(getattr(m, s).numel() for s in EXPERT_STACKS if isinstance(getattr(m, s, None), nn.Parameter))
             for _, m in experts_modules(model)]
    return sum(sizes), max(sizes, default=0)


__all__ = ["ENGINE", "EXPERT_STACKS", "engine_experts_forward", "engine_layers", "experts_modules", "gated_experts",
           "layout_problem", "register_engine", "routed_expert_parameters", "use_engine"]
