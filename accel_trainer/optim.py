"""Optimizers and LR schedules: Muon for hidden matrices, AdamW for the rest, acting as one.

* :class:`Muon` is ``torch.optim.Muon``'s algorithm (same defaults, same ``momentum_buffer`` state)
  extended to stacked 3D expert weights: the Newton-Schulz orthogonalisation runs batched over the
  leading dimension, so each expert's matrix is orthogonalised and LR-scaled on its own.
* :class:`OptimizersContainer` makes the named optimizers look like one ``torch.optim.Optimizer``:
  ``accelerator.prepare`` wraps it once, so the fp16 grad scaler unscales, checks and updates once
  per step however many optimizers there are, and its ``state_dict`` is keyed by name.
* LR schedules are pure functions of the step (warmup + cosine, or warmup-stable-decay): the LR of a
  step is ``initial_lr * lr_multiplier(step)``, so there is no scheduler state to save, and a resume
  with another peak LR or length simply follows the new values.
"""

from __future__ import annotations

import math
from collections import ChainMap
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

# torch.optim.Muon's Newton-Schulz coefficients (Keller Jordan's quintic iteration).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7

def zeropower_via_newtonschulz(update: torch.Tensor, steps: int = NS_STEPS, eps: float = NS_EPS,
                               coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise each matrix in the last two dims of ``update`` (batched over the rest).

    ``dtype`` of the iteration: None means bfloat16 on CUDA (as torch.optim.Muon) and float32
    elsewhere, because most CPUs have no native bf16 GEMM and emulate it, far slower than fp32.
    """
    a, b, c = coefficients
    transposed = update.size(-2) > update.size(-1)
    if dtype is None:
        dtype = torch.bfloat16 if update.is_cuda else torch.float32
    x = update.to(dtype)
    if transposed:
        x = x.mT
    # Work on a [batch, rows, cols] view so the fused baddbmm matches torch.optim.Muon's addmm
    # rounding for one matrix; the per-matrix norm keeps each expert's spectral norm <= 1 on its own.
    shape = x.shape
    x = x.reshape(-1, *shape[-2:])
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    x = x.reshape(shape)
    return x.mT if transposed else x


class Muon(Optimizer):
    """Muon (momentum + Newton-Schulz orthogonalised update) for 2D and stacked (..., out, in) weights.

    Args:
        params: parameters or named parameters (``(name, tensor)`` pairs) with ``ndim >= 2``.
        lr: learning rate, scaled per matrix by ``sqrt(max(1, out/in))`` as in torch.optim.Muon.
        weight_decay: decoupled weight decay.
        momentum: momentum coefficient.
        nesterov: use the Nesterov-style update.
        ns_steps: Newton-Schulz iterations.
        ns_dtype: dtype of the iteration; None picks bf16 on CUDA, fp32 elsewhere.
    """

    def __init__(self, params, lr: float = 0.02, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = NS_STEPS, ns_dtype: torch.dtype | None = None):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"Muon: lr={lr}, momentum={momentum}, weight_decay={weight_decay} must be >= 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps))
        # Not a param-group entry: a torch.dtype in the state dict would not load with weights_only.
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.ndim < 2:
                    name = group.get("param_names", [None] * (i + 1))[i] or f"#{i}"
                    raise ValueError(f"Muon: parameter {name} has shape {tuple(p.shape)}; Muon needs ndim >= 2")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owners = _Owners()  # who orthogonalises each gathered matrix (the same answer on every rank)
        self.ns_matrices = 0
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            layout = MatrixLayout.of(group)  # once per group: every parameter of it is read the same way
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = self._orthogonalize(update, group["ns_steps"], owners, layout)
                p.mul_(1 - lr * group["weight_decay"])
                if layout.parts is None:
                    out_dim, in_dim = layout.out_in(p.shape)
                    p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, out_dim / in_dim)))
                else:  # each part was scaled by its own shape in _orthogonalize
                    p.add_(update.to(p.dtype), alpha=-lr)
        return loss

    def _newton_schulz(self, x: torch.Tensor, steps: int, layout: "MatrixLayout") -> torch.Tensor:
        """Newton-Schulz of ``x``, or of each part of a fused matrix, each scaled by its own shape."""
        if layout.parts is None:
            self.ns_matrices += x[..., 0, 0].numel()
            return zeropower_via_newtonschulz(x, steps=steps, dtype=self.ns_dtype)
        pieces = []
        for piece in layout.split(x):
            self.ns_matrices += piece[..., 0, 0].numel()
            out_dim, in_dim = layout.out_in(piece.shape)
            pieces.append(zeropower_via_newtonschulz(piece, steps=steps, dtype=self.ns_dtype)
                          * math.sqrt(max(1.0, out_dim / in_dim)))
        return layout.join(pieces)

    def _orthogonalize(self, update: torch.Tensor, steps: int, owners: "_Owners",
                       layout: "MatrixLayout | None" = None) -> torch.Tensor:
        layout = layout or MatrixLayout()
        if type(update).__name__ == "DTensor":
            return self._orthogonalize_sharded(update, steps, owners, layout)
        return self._newton_schulz(update, steps, layout)

    def _orthogonalize_sharded(self, update, steps: int, owners: "_Owners", layout: "MatrixLayout"):
        """Newton-Schulz on an FSDP2-sharded (DTensor) update, each matrix computed once.

        Stacked expert weights are sharded on dim 0, the expert dimension, so each rank holds whole
        experts and orthogonalises them locally. A matrix sharded by rows or columns is gathered; one
        rank (its owner, picked so that every rank gets a similar share of the work) orthogonalises
        it, and the owner's result is scattered back as every rank's shard. Meshes of more than one
        dimension (HSDP) orthogonalise on every rank, as the gathered matrix is then not one rank's.
        """
        from torch.distributed.tensor import DTensor, distribute_tensor

        mesh, placements = update.device_mesh, update.placements
        matrix_dims = {update.ndim - 2, update.ndim - 1}
        if not any(pl.is_shard() and pl.dim in matrix_dims for pl in placements):
            local = self._newton_schulz(update.to_local(), steps, layout)
            return DTensor.from_local(local, mesh, placements, shape=update.shape, stride=update.stride())
        full = update.full_tensor()
        if mesh.ndim != 1:
            return distribute_tensor(self._newton_schulz(full, steps, layout), mesh, placements, src_data_rank=None)
        owner = owners.pick(full.shape, mesh.size())
        if mesh.get_local_rank() == owner:
            result = self._newton_schulz(full, steps, layout)
        else:  # only the shape and dtype count: distribute_tensor sends the owner's values
            dtype = self.ns_dtype or (torch.bfloat16 if full.is_cuda else torch.float32)
            result = torch.empty(full.shape, dtype=dtype, device=full.device)
        return distribute_tensor(result, mesh, placements, src_data_rank=owner)


def newton_schulz_flops(shape: tuple[int, ...], steps: int = NS_STEPS) -> float:
    """FLOPs of Newton-Schulz on a ``[..., rows, cols]`` update: per iteration X X^T, the quintic
    polynomial of that Gram matrix, and its product with X."""
    m, n = sorted(shape[-2:])
    batch = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return batch * steps * (4 * m * m * n + 2 * m**3)


class _Owners:
    """Assigns each gathered matrix to the rank with the least Newton-Schulz work so far (lowest
    rank on ties): deterministic from the shapes alone, so every rank picks the same owner."""

    def __init__(self):
        self.load: list[float] = []

    def pick(self, shape, world: int) -> int:
        if len(self.load) != world:
            self.load = [0.0] * world
        owner = min(range(world), key=lambda r: (self.load[r], r))
        self.load[owner] += newton_schulz_flops(tuple(shape))
        return owner


@dataclass(frozen=True)
class MatrixLayout:
    """How Muon reads one parameter as matrices (kept in its param group, so it survives
    ``accelerator.prepare``, FSDP2 and checkpoints): ``in_out`` for weights stored [in, out]
    (transformers' ``Conv1D``, GPT-2's), ``parts`` = ``(dim, sizes)`` for a fused matrix whose
    parts are orthogonalised one by one (``gate_up_proj`` of transformers' MoE experts, a fused QKV),
    or ``(dim, sizes, heads)`` when the parts repeat per head (GPT-NeoX's q/k/v of each head in turn:
    part ``j`` is the ``j``-th slice of every head, put together)."""

    parts: tuple | None = None
    in_out: bool = False

    @classmethod
    def of(cls, group: dict) -> "MatrixLayout":
        parts = group.get("parts")
        if parts is not None:
            parts = (int(parts[0]), tuple(int(n) for n in parts[1]), *(int(h) for h in parts[2:3]))
        return cls(parts, bool(group.get("in_out", False)))

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The parts of the fused matrix ``x`` (per-head parts gathered into one matrix each)."""
        dim, sizes = self.parts[0], list(self.parts[1])
        if len(self.parts) == 2:
            return list(x.split(sizes, dim=dim))
        heads, flip = self.parts[2], dim == -1  # work with the split dimension at -2
        x = (x.mT if flip else x).unflatten(-2, (heads, sum(sizes)))  # [..., heads, per_head, in]
        return [p.flatten(-3, -2).mT if flip else p.flatten(-3, -2) for p in x.split(sizes, dim=-2)]

    def join(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        dim = self.parts[0]
        if len(self.parts) == 2:
            return torch.cat(pieces, dim=dim)
        heads, flip = self.parts[2], dim == -1
        x = torch.cat([(p.mT if flip else p).unflatten(-2, (heads, -1)) for p in pieces], dim=-2).flatten(-3, -2)
        return x.mT if flip else x

    def out_in(self, shape) -> tuple[int, int]:
        rows, cols = shape[-2:]
        return (cols, rows) if self.in_out else (rows, cols)

    def group_keys(self) -> dict:
        """Param-group entries (none for a plain matrix: older checkpoints' groups stay as they were)."""
        keys = {}
        if self.parts is not None:
            keys["parts"] = [self.parts[0], list(self.parts[1]), *self.parts[2:3]]
        if self.in_out:
            keys["in_out"] = True
        return keys


@dataclass(frozen=True)
class Assignment:
    """One trainable parameter's optimizer and why."""

    name: str
    optimizer: str
    reason: str
    numel: int
    layout: MatrixLayout = MatrixLayout()


@dataclass(frozen=True)
class ParameterRule:
    """A model family's parameter rule, as tables of regular expressions searched in parameter names
    (first match wins), on top of what holds for every model: 1D tensors, the input embeddings and
    the output head (found by the model's own getters) and ``nn.Embedding`` weights go to AdamW;
    every other matrix goes to Muon.

    Attributes:
        adamw: ``(pattern, reason)``: matrices that stay on AdamW (routers and gates: tiny, sensitive).
        adamw_modules: substrings of a module's class name whose matrices stay on AdamW (``Router``).
        fused: ``(pattern, kind)``: matrices Muon orthogonalises part by part. ``halves``: two equal
            parts (``gate_up_proj``); ``qkv``: q, k, v one after the other (sized by the config's heads);
            ``qkv_per_head``: q, k, v interleaved per head (GPT-NeoX's ``query_key_value``).
    """

    adamw: tuple[tuple[str, str], ...] = ()
    adamw_modules: tuple[str, ...] = ()
    fused: tuple[tuple[str, str], ...] = ()

    def adamw_reason(self, name: str, owner: nn.Module) -> str | None:
        import re

        for pattern, reason in self.adamw:
            if re.search(pattern, name):
                return reason
        kind = type(owner).__name__.lower()
        return next((f"{sub} module" for sub in self.adamw_modules if sub.lower() in kind), None)

    def fused_kind(self, name: str) -> str | None:
        import re

        return next((kind for pattern, kind in self.fused if re.search(pattern, name)), None)


#: The rule for any transformers causal LM (the names their architectures use).
GENERIC_RULE = ParameterRule(
    adamw=((r"(^|\.)(gate|router)(\.weight)?$", "router"),
           (r"(^|\.)shared_expert_gate\.weight$", "shared-expert gate"),
           (r"(^|\.)(embed_tokens|wte|wpe|embed_positions|lm_head)\.", "embedding or head")),
    adamw_modules=("Router",),
    fused=((r"(^|\.)gate_up_proj(\.weight)?$", "halves"),
           (r"(^|\.)query_key_value\.weight$", "qkv_per_head"),
           (r"(^|\.)(qkv_proj|Wqkv|c_attn|qkv)\.weight$|(^|\.)in_proj_weight$", "qkv")),
)


def _fused_parts(kind: str | None, p: torch.Tensor, layout_in_out: bool, config) -> tuple | None:
    """``(dim, sizes)`` (or ``(dim, sizes, heads)`` when the parts are interleaved per head) of a
    fused matrix, or None. The output dimension is split: -2 for [out, in] weights and stacked
    experts [E, out, in], -1 for ``Conv1D``'s [in, out]."""
    if kind is None:
        return None
    out_dim = -1 if layout_in_out else -2
    out = p.shape[out_dim]
    if kind == "halves":
        return (out_dim, (out // 2, out // 2)) if out % 2 == 0 else None
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if kind == "qkv_per_head":  # [heads, 3, head_dim] along the output: GPT-NeoX
        if heads and out % (3 * heads) == 0:
            head_dim = out // (3 * heads)
            return (out_dim, (head_dim,) * 3, heads)
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads:
        head_dim = getattr(config, "head_dim", None) or out // (heads + 2 * kv)
        sizes = (heads * head_dim, kv * head_dim, kv * head_dim)
        if sum(sizes) == out:
            return (out_dim, sizes)
    return (out_dim, (out // 3,) * 3) if out % 3 == 0 else None


def assign_parameters(model: nn.Module, muon_patterns=(), adamw_patterns=(),
                      rule: ParameterRule | None = None) -> list[Assignment]:
    """Which optimizer takes each trainable parameter, by rule, with the reason.

    The rule (``rule``: the model family's; :data:`GENERIC_RULE` by default): Muon for the hidden
    matrices of the blocks, the stacked 3D expert weights included (orthogonalised per expert, and a
    fused matrix per part); AdamW for embeddings, the output head, norms, biases, routers/gates and
    anything 1D. ``muon_patterns``/``adamw_patterns`` (regular expressions searched in the names)
    override the rule, AdamW's first. Every trainable parameter lands in exactly one optimizer.

    Raises:
        ValueError: a pattern sends a parameter of fewer than 2 dimensions to Muon, or matches no
            trainable parameter (a typo would silently change nothing).
    """
    import re

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # only transformers' GPT-2 family stores weights [in, out]
        Conv1D = ()
    rule = rule if rule is not None else GENERIC_RULE
    config = getattr(model, "config", None)
    special = {}
    for getter, reason in (("get_input_embeddings", "embedding"), ("get_output_embeddings", "output head")):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (NotImplementedError, AttributeError):
            module = None
        if module is not None and getattr(module, "weight", None) is not None:
            special.setdefault(id(module.weight), reason)
    if not any(reason == "output head" for reason in special.values()):
        # A module of your own: the output head is its last linear layer when that reads out one row
        # per id of one of its embeddings (the vocabulary).
        rows = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
        last = next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)
        if last is not None and last.out_features in rows:
            special.setdefault(id(last.weight), "output head")
    out, used = [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else model
        in_out = isinstance(owner, Conv1D) if Conv1D else False
        layout = (MatrixLayout(_fused_parts(rule.fused_kind(name), p, in_out, config), in_out) if p.ndim >= 2
                  else MatrixLayout())
        adamw_hit = next((pat for pat in adamw_patterns if re.search(pat, name)), None)
        if adamw_hit is not None:
            used.add(("adamw", adamw_hit))
            out.append(Assignment(name, "adamw", "--adamw_params", p.numel()))
            continue
        muon_hit = next((pat for pat in muon_patterns if re.search(pat, name)), None)
        if muon_hit is not None:
            used.add(("muon", muon_hit))
            if p.ndim < 2:
                raise ValueError(f"--muon_params: {name} has shape {tuple(p.shape)}; Muon takes matrices only")
            out.append(Assignment(name, "muon", "--muon_params", p.numel(), layout))
            continue
        if p.ndim < 2:
            reason = "bias" if name.endswith("bias") else "norm or other 1D"
        elif id(p) in special:
            reason = special[id(p)]
        elif isinstance(owner, nn.Embedding):
            reason = "embedding"
        else:
            reason = rule.adamw_reason(name, owner)
        if reason is None:
            kind = "expert stack" if p.ndim == 3 else "hidden matrix"
            out.append(Assignment(name, "muon", kind + (", fused: per "
                                                        "part" if layout.parts else ""), p.numel(), layout))
            continue
        out.append(Assignment(name, "adamw", reason, p.numel()))
    for flag, patterns in (("adamw", adamw_patterns), ("muon", muon_patterns)):
        unused = [pat for pat in patterns if (flag, pat) not in used]
        if unused:
            raise ValueError(f"--{flag}_params {unused[0]!r}: matches no trainable parameter (names look like "
                             f"{', '.join(n for n, p in list(model.named_parameters())[:3])}); fix the pattern or "
                             "drop it")
    names = [a.name for a in out]
    if len(names) != len(set(names)):  # nanochat's assert: each parameter in exactly one optimizer
        raise ValueError(f"parameters assigned twice: {sorted({n for n in names if names.count(n) > 1})}")
    return out


def freeze_parameters(model: nn.Module, patterns=()) -> list[Assignment]:
    """``--freeze_params``: parameters whose name one of ``patterns`` (regular expressions) finds stop
    taking gradients, so no optimizer holds them; returned as rows of the assignment table.

    Raises:
        ValueError: a pattern that matches no parameter (a typo would silently train everything).
    """
    import re

    frozen, used = [], set()
    for name, p in model.named_parameters():
        hit = next((pat for pat in patterns if re.search(pat, name)), None)
        if hit is not None:
            used.add(hit)
            p.requires_grad_(False)
            frozen.append(Assignment(name, "frozen", "--freeze_params", p.numel()))
    unused = [pat for pat in patterns if pat not in used]
    if unused:
        raise ValueError(f"--freeze_params {unused[0]!r}: matches no parameter (names look like "
                         f"{', '.join(n for n, _ in list(model.named_parameters())[:3])}); fix the pattern or drop it")
    return frozen


def split_parameters(model: nn.Module, muon_patterns=(), adamw_patterns=(), rule: ParameterRule | None = None):
    """Trainable parameters as (muon, adamw) lists of ``(name, parameter)``, by :func:`assign_parameters`."""
    params = dict(model.named_parameters())
    muon, adamw = [], []
    for a in assign_parameters(model, muon_patterns, adamw_patterns, rule):
        (muon if a.optimizer == "muon" else adamw).append((a.name, params[a.name]))
    return muon, adamw


def assignment_table(assignments: list[Assignment], examples: int = 3) -> str:
    """What :func:`assign_parameters` decided, as the lines a run prints: per optimizer and reason,
    tensors, parameters and a few names."""
    rows = {}
    for a in assignments:
        row = rows.setdefault((a.optimizer, a.reason), [0, 0, []])
        row[0] += 1
        row[1] += a.numel
        row[2].append(a.name)
    lines = [f"{'optimizer':<10}{'why':<30}{'tensors':>8}{'parameters':>14}  e.g."]
    for (opt, reason), (count, numel, names) in sorted(rows.items()):
        shown = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
        lines.append(f"{opt:<10}{reason:<30}{count:>8}{numel:>14,}  {shown}")
    return "\n".join(lines)


def assignment_summary(assignments: list[Assignment]) -> dict:
    """JSON for the run config: per optimizer, its tensors and parameters, and every name."""
    out: dict = {}
    for a in assignments:
        entry = out.setdefault(a.optimizer, {"tensors": 0, "parameters": 0, "names": []})
        entry["tensors"] += 1
        entry["parameters"] += a.numel
        entry["names"].append(a.name)
    return out


class OptimizersContainer(Optimizer):
    """Several named optimizers behaving as one ``Optimizer`` (torchtitan's OptimizersContainer idea).

    ``param_groups`` is the concatenation of the children's group dicts (the same objects, so LR
    changes reach the children). ``state_dict()`` has the standard optimizer layout, so
    ``torch.distributed.checkpoint`` (FSDP2 sharded saving) handles it like any optimizer, and every
    group is tagged with its optimizer's name (``"optimizer": "muon"``) and its ``param_names``: the
    checkpoint says which optimizer owns which parameter by name, not by position.
    """

    def __init__(self, optimizers: dict[str, Optimizer]):
        self.optimizers = dict(optimizers)
        # Optimizer.__init__ sets up what Accelerate and torch.distributed.checkpoint expect of an
        # optimizer (hook registries, the profiled step); its one group is then replaced by the
        # children's groups (the same dicts, so LR changes reach them) and its state by a live view.
        super().__init__([p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]], {})
        self._follow_children()
        for opt in self.optimizers.values():
            # A child's load_state_dict replaces its group dicts and state: follow them (public hook).
            opt.register_load_state_dict_post_hook(lambda _opt: self._follow_children())

    def _follow_children(self) -> None:
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.state = ChainMap(*(opt.state for opt in self.optimizers.values()))

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.optimizers.values():
            opt.step()
        return loss

    def set_lr(self, multiplier: float) -> None:
        """Every group's LR = its ``initial_lr`` (the peak, from the flags) x ``multiplier``."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def lrs(self) -> dict[str, float]:
        """The current LR of each optimizer (its first group), by name."""
        return {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        groups, state, offset = [], {}, 0
        for name, opt in self.optimizers.items():
            child = opt.state_dict()
            for group in child["param_groups"]:
                groups.append({**group, "optimizer": name, "params": [i + offset for i in group["params"]]})
            state.update({i + offset: v for i, v in child["state"].items()})
            offset += sum(len(g["params"]) for g in child["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load after checking that every optimizer's groups hold the same parameter names and shapes.

        Raises:
            ValueError: naming the optimizer, group and parameters that differ.
        """
        by_name: dict[str, list[dict]] = {}
        for group in state_dict["param_groups"]:
            by_name.setdefault(group.get("optimizer", "?"), []).append(group)
        missing = sorted(set(self.optimizers) - set(by_name))
        extra = sorted(set(by_name) - set(self.optimizers))
        if missing or extra:
            raise ValueError(f"optimizer state has optimizers {sorted(by_name)} but this run has "
                             f"{sorted(self.optimizers)} (missing {missing}, unexpected {extra})")
        children = {}
        for name, saved_groups in by_name.items():
            ids = [i for g in saved_groups for i in g["params"]]
            local = {old: new for new, old in enumerate(ids)}
            children[name] = {
                "state": {local[i]: state_dict["state"][i] for i in ids if i in state_dict["state"]},
                "param_groups": [{**{k: v for k, v in g.items() if k != "optimizer"},
                                  "params": [local[i] for i in g["params"]]} for g in saved_groups]}
            check_optimizer_state_matches(name, self.optimizers[name], children[name])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(children[name])

    def __repr__(self) -> str:
        return f"OptimizersContainer({', '.join(f'{k}={type(v).__name__}' for k, v in self.optimizers.items())})"


def check_optimizer_state_matches(name: str, optimizer: Optimizer, saved: dict) -> None:
    """Raise ValueError unless ``saved`` has the same groups, parameter names and state shapes."""
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise ValueError(f"optimizer {name!r}: checkpoint has {len(saved_groups)} param groups, "
                         f"this run has {len(groups)}")
    for gi, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        now, then = group.get("param_names"), saved_group.get("param_names")
        if now is None or then is None:
            raise ValueError(f"optimizer {name!r} group {gi}: parameter names are missing, cannot match by name")
        if now != then:
            gone = sorted(set(then) - set(now))
            new = sorted(set(now) - set(then))
            raise ValueError(f"optimizer {name!r} group {gi}: parameters differ from the checkpoint "
                             f"(only in checkpoint: {gone[:8]}, only in this run: {new[:8]}"
                             f"{', same names in another order' if not gone and not new else ''})")
        for pname, p, pid in zip(now, group["params"], saved_group["params"]):
            for key, value in saved.get("state", {}).get(pid, {}).items():
                if torch.is_tensor(value) and value.ndim > 0 and value.shape != p.shape:
                    raise ValueError(f"optimizer {name!r}: state {key!r} of {pname} has shape "
                                     f"{tuple(value.shape)} but the parameter has {tuple(p.shape)}")


@dataclass
class OptimizerSettings:
    """What :func:`build_optimizers` needs; filled from the training arguments."""

    muon_lr: float
    adamw_lr: float
    weight_decay: float = 0.0       # AdamW's, on its matrices only
    muon_weight_decay: float = 0.0
    muon_momentum: float = 0.95
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8


def build_optimizers(model: nn.Module, settings: OptimizerSettings,
                     assignments: list[Assignment] | None = None) -> OptimizersContainer:
    """Muon over the hidden matrices and AdamW over everything else (by :func:`assign_parameters`,
    or the ``assignments`` given), in one container."""
    assignments = assign_parameters(model) if assignments is None else assignments
    params = dict(model.named_parameters())
    muon_params = [(a, params[a.name]) for a in assignments if a.optimizer == "muon"]
    adamw_params = [(a.name, params[a.name]) for a in assignments if a.optimizer == "adamw"]
    optimizers: dict[str, Optimizer] = {}
    if muon_params:
        # One group per matrix layout (plain matrices: one group, as older checkpoints have it).
        by_layout: dict[MatrixLayout, list] = {}
        for a, p in muon_params:
            by_layout.setdefault(a.layout, []).append((a.name, p))
        groups = [{"params": named, **layout.group_keys()} for layout, named in by_layout.items()]
        optimizers["muon"] = Muon(groups if len(groups) > 1 or groups[0].keys() != {"params"} else groups[0]["params"],
                                  lr=settings.muon_lr, weight_decay=settings.muon_weight_decay,
                                  momentum=settings.muon_momentum)
    if adamw_params:
        # As the HF Trainer: weight decay on matrices (embeddings, head, router), never on norms and
        # biases. Without decay there is one group (the layout of older checkpoints; either loads
        # into the other, state being kept by parameter name).
        decay = [(n, p) for n, p in adamw_params if p.ndim >= 2]
        groups = ([{"params": decay, "weight_decay": settings.weight_decay},
                   {"params": [(n, p) for n, p in adamw_params if p.ndim < 2], "weight_decay": 0.0}]
                  if settings.weight_decay and decay else [{"params": adamw_params, "weight_decay": 0.0}])
        optimizers["adamw"] = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=settings.adamw_lr, betas=(settings.adam_beta1, settings.adam_beta2),
            eps=settings.adam_epsilon, foreach=False)
    for opt in optimizers.values():
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]  # the peak LR, which the schedule multiplies
    return OptimizersContainer(optimizers)


def lr_multiplier(step: int, *, kind: str, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1, decay_ratio: float = 0.2) -> float:
    """LR factor at ``step`` (0-based count of finished optimizer steps); past ``total_steps`` the
    final factor holds.

    ``cosine``: linear warmup, then cosine from 1 to ``min_lr_ratio`` at ``total_steps``.
    ``linear``: linear warmup, then linear from 1 to ``min_lr_ratio`` at ``total_steps``.
    ``wsd``: linear warmup, constant, then linear decay to ``min_lr_ratio`` over the last
    ``decay_ratio`` of the steps. ``constant``: warmup then 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / progress_steps)
    if kind == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - (1 - min_lr_ratio) * progress
    if kind == "wsd":
        decay_start = 1.0 - decay_ratio
        if progress <= decay_start:
            return 1.0
        return 1.0 - (1 - min_lr_ratio) * (progress - decay_start) / max(decay_ratio, 1e-12)
    raise ValueError(f"lr_scheduler_type={kind!r}: expected 'cosine', 'linear', 'wsd' or 'constant'")
