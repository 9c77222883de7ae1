"""Decoder-only mixture-of-experts transformer as a `transformers` PreTrainedModel.

Expert weights are stacked per layer as 3D tensors ``[num_experts, out, in]`` so that one tensor holds
one kind of matrix for every expert (the optimizer orthogonalises each expert's slice on its own).
Tokens are dispatched by sorting their (token, expert) assignments by expert; each projection of
every expert is then one grouped matmul (``F.grouped_mm``) over the sorted rows, with the experts'
row offsets computed on the device: no host sync in the forward or the backward. Where grouped_mm
refuses the device or dtype, a loop over experts is used instead (chosen once per device and dtype).

Under expert parallelism (``accel_trainer.parallel.ExpertParallel``) the expert stacks are DTensors
sharded on the expert dimension over an ``ep`` process group: the sorted rows travel to the rank of
their expert and back with two autograd-aware ``all_to_all`` calls (:func:`experts_on_their_ranks`);
routing, the balance loss and the load counts are computed before the exchange, so they are unchanged.

Generation goes through transformers' ``GenerationMixin`` (``model.generate(...)``) with a KV cache
(``DynamicCache``); training passes neither a cache nor a mask and takes SDPA's causal fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_moe import MoEConfig


# Where outputs carry the KV cache that `generate` passes back: `cache` in recent transformers,
# `past_key_values` before (recent versions rename the old name with a deprecation warning).
CACHE_KEY = "cache" if hasattr(ModelOutput, "_replace_old_cache_name") else "past_key_values"


@dataclass
class MoECausalLMOutput(ModelOutput):
    """Forward result: ``loss`` = ``lm_loss`` + ``router_aux_loss_coef`` * ``aux_loss`` when labels are
    given; ``expert_load`` [layers, experts] counts the token slots routed to each expert (for telemetry).
    With a KV cache, the cache is added under the key this transformers version reads (see forward)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype,
                   positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of positions ``0..seq_len-1`` ([seq, head_dim]), or of ``positions`` ([batch, seq] ->
    [batch, 1, seq, head_dim], one row per sequence: left-padded prompts, decoding after a cache)."""
    # Computed per forward instead of cached in a buffer: it is cheap next to attention, and a
    # non-persistent buffer would be left uninitialised when the model is built on the meta device.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if positions is None:
        angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    else:
        angles = (positions.to(torch.float32)[..., None] * inv_freq)[:, None]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_bias(attention_mask: torch.Tensor, query_len: int, dtype) -> torch.Tensor:
    """Additive mask [batch, 1, query, key] from a 2D padding mask over all keys (cached + new): a
    query sees the unpadded keys up to its own position. A padded query row keeps a finite minimum,
    not -inf, so that SDPA returns numbers there (they are never used) instead of NaN."""
    key_len = attention_mask.shape[-1]
    causal = torch.ones(query_len, key_len, dtype=torch.bool, device=attention_mask.device).tril(key_len - query_len)
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: MoEConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: Cache | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        # Without a mask the queries are the last `seq` of the keys: causal when they are all of them
        # (training, a prompt), everything when there is one (a decoding step).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))


class SwiGLU(nn.Module):
    """Dense gated MLP; used for the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: grouped_mm's CPU backward
    refuses a gradient with zero strides (such as the one a ``.sum()`` hands back)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``F.grouped_mm`` runs forward and backward on this device type and dtype; tried once
    per pair, so the kernel is chosen once, not per step.

    The first call can come from inside an activation-checkpointed layer's forward: the probe's own
    saved tensors must not count there, or the recomputation (which skips the probe) saves fewer
    tensors than the forward did and torch.utils.checkpoint refuses the backward. Identity
    saved-tensor hooks, innermost, keep the probe out of the checkpoint's bookkeeping."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_WORKS:
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                a = torch.ones(4, 8, device=device, dtype=dtype, requires_grad=True)
                b = torch.ones(2, 8, 8, device=device, dtype=dtype, requires_grad=True)
                offsets = torch.tensor([1, 4], device=device, dtype=torch.int32)
                out = F.grouped_mm(a, b.transpose(-2, -1), offs=offsets)
                out.backward(torch.ones_like(out))
            _GROUPED_MM_WORKS[key] = True
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            _GROUPED_MM_WORKS[key] = False
    return _GROUPED_MM_WORKS[key]


def experts_forward(x: torch.Tensor, offsets: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                    down: torch.Tensor, grouped: bool = True) -> torch.Tensor:
    """Each expert's SwiGLU on its rows of ``x`` (rows sorted by expert; ``offsets[e]`` = end of
    expert ``e``'s rows, int32). Grouped: one grouped matmul per projection, no host sync. Not
    grouped: one matmul per expert, which needs the row counts on the host (one sync per layer)."""
    if grouped:
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's lists: cast as it would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate, up, down = x.to(dtype), gate.to(dtype), up.to(dtype), down.to(dtype)
        gate_out = _ContiguousGrad.apply(F.grouped_mm(x, gate.transpose(-2, -1), offs=offsets))
        up_out = _ContiguousGrad.apply(F.grouped_mm(x, up.transpose(-2, -1), offs=offsets))
        return _ContiguousGrad.apply(F.grouped_mm(F.silu(gate_out) * up_out, down.transpose(-2, -1), offs=offsets))
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()  # the fallback's one sync
    outputs = [(F.silu(rows @ gate[e].t()) * (rows @ up[e].t())) @ down[e].t()
               for e, rows in enumerate(x.split(sizes)) if rows.shape[0]]
    return torch.cat(outputs) if outputs else x.new_zeros(0, down.shape[1])


_experts_outside_compile = torch.compiler.disable(experts_forward)


class _Rows(torch.autograd.Function):
    """``x[index]`` where ``index`` repeats each row of ``x`` ``copies`` times and ``inverse`` says
    where each (row, copy) went: the backward is a gather too (``grad[inverse]`` summed over the
    copies) instead of the scatter-add autograd would use, which on CPU sorts the indices first."""

    @staticmethod
    def forward(ctx, x, index, inverse, copies):
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        if ctx.copies > 1:
            grad = grad.view(-1, ctx.copies, grad.shape[-1]).sum(1)
        return grad, None, None, None


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    # A functional collective returns an async tensor that waits when first used; wait here, explicitly.
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return tensor.wait() if isinstance(tensor, AsyncCollectiveTensor) else tensor


@torch.compiler.disable  # the split sizes are data (a host sync); compiled layers run around it
def experts_on_their_ranks(rows: torch.Tensor, counts: torch.Tensor, weights: tuple, group, experts_fn,
                           grouped: bool) -> torch.Tensor:
    """Expert parallelism: ``rows`` (sorted by global expert; ``counts[e]`` rows for expert ``e``) go
    to the rank that holds their expert, through that rank's experts, and back in the same order.

    ``weights`` are the (gate, up, down) stacks as DTensors sharded on dim 0 over ``group``: this rank
    holds experts ``[rank * E/ep, (rank + 1) * E/ep)``. Two ``all_to_all`` with uneven splits move the
    rows (autograd-aware: the backward sends the gradients the opposite way); one more exchanges the
    counts, whose sizes the host needs (one sync per layer, as every expert-parallel MoE has).
    """
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    ep = dist.get_world_size(group)
    local = [w.to_local() for w in weights]
    if not torch.is_autocast_enabled(rows.device.type) and local[0].dtype != rows.dtype:
        local = [w.to(rows.dtype) for w in local]  # FSDP2 mixed precision casts the inputs, not these weights
    per_rank = local[0].shape[0]
    # Row counts from every source rank for this rank's experts: [source, local expert].
    arriving = torch.empty_like(counts)
    dist.all_to_all_single(arriving, counts, group=group)
    arriving = arriving.view(ep, per_rank)
    sizes = torch.cat([counts.view(ep, per_rank).sum(1), arriving.sum(1)]).tolist()
    send, receive = sizes[:ep], sizes[ep:]
    received = _waited(all_to_all_single_autograd(rows, receive, send, group))
    # Rows arrive grouped by source, then by expert: one stable sort groups them by expert.
    expert_of_row = torch.arange(per_rank, device=rows.device).repeat(ep).repeat_interleave(
        arriving.reshape(-1), output_size=sum(receive))
    order = expert_of_row.argsort(stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=rows.device))
    offsets = arriving.sum(0).cumsum(0).to(torch.int32)
    # A permutation there and back: gathers both ways, also in the backward (as in the layer itself).
    out = experts_fn(_Rows.apply(received, order, position, 1), offsets, *local, grouped=grouped)
    out = _Rows.apply(out, position, order, 1)  # back to arrival order
    return _waited(all_to_all_single_autograd(out, send, receive, group))


def sort_by_expert(top_k_index: torch.Tensor, num_experts: int):
    """The dispatch plan of the router's choices ``top_k_index`` [tokens, k], all on the device (no
    host sync): ``order`` (sorted row i is slot ``order[i]``, slot = token * k + choice), its inverse
    ``position``, the slots per expert ``counts`` (int64) and their ends ``offsets`` (int32)."""
    flat = top_k_index.reshape(-1)
    order = flat.argsort(stable=True)
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=flat.device))
    # scatter_add, not bincount: bincount's output size depends on the data (a host sync on GPU).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    return order, position, counts, counts.cumsum(0).to(torch.int32)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts with stacked weights, an optional shared expert, and a balance loss."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        e, d, f = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = nn.Linear(d, e, bias=False)
        # [experts, out, in], the nn.Linear convention per expert.
        self.gate_proj = nn.Parameter(torch.empty(e, f, d))
        self.up_proj = nn.Parameter(torch.empty(e, f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))
        self.shared_expert = (SwiGLU(d, config.shared_expert_intermediate_size)
                              if config.shared_expert_intermediate_size > 0 else None)
        # The expert-parallel process group once ExpertParallel sharded the stacks (None: all experts here).
        self.expert_group = None

    @staticmethod
    def experts_kernel(x: torch.Tensor):
        """The experts function for this input and whether it is grouped (decided once per device/dtype)."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if not torch.compiler.is_compiling():
            return experts_forward, grouped_mm_works(x.device, dtype)
        grouped = _GROUPED_MM_WORKS.get((x.device.type, dtype), True)  # known: an eager step ran first
        # torch.compile's shape function for grouped_mm accepts only bf16 (its CUDA kernel's rule), while
        # the CPU kernel also runs fp32: then the experts run eagerly between two compiled regions.
        return (experts_forward if dtype == torch.bfloat16 or not grouped else _experts_outside_compile), grouped

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the layer's output, its balance loss, and the slots routed to each expert [experts]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        num_tokens = x.shape[0]
        probs = self.router(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        order, position, counts, offsets = sort_by_expert(experts, self.num_experts)
        experts, grouped = self.experts_kernel(x)
        rows = _Rows.apply(x, order // self.top_k, position, self.top_k)  # one gather in
        if self.expert_group is None:
            routed = experts(rows, offsets, self.gate_proj, self.up_proj, self.down_proj, grouped=grouped)
        else:
            routed = experts_on_their_ranks(rows, counts, (self.gate_proj, self.up_proj, self.down_proj),
                                            self.expert_group, experts_forward, grouped)
        # One gather out, back to (token, choice) order, then each token's k outputs weighted and summed.
        slots = _Rows.apply(routed, position, order, 1).view(num_tokens, self.top_k, -1)
        out = torch.bmm(weights.to(x.dtype).unsqueeze(1), slots).squeeze(1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)

        # Switch-style balance loss: num_experts * sum_e(fraction of slots to e * mean prob of e);
        # equals 1 when routing is uniform.
        slot_fraction = counts.float() / (num_tokens * self.top_k)
        aux_loss = self.num_experts * torch.sum(slot_fraction * probs.mean(dim=0))
        return out.reshape(shape), aux_loss, counts


class DecoderLayer(GradientCheckpointingLayer):
    """Attention then MoE feed-forward, each pre-normed with a residual; recomputed in the backward
    when activation checkpointing is on (``model.gradient_checkpointing_enable()``)."""

    def __init__(self, config: MoEConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoEFeedForward(config)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, cache=cache)
        mlp_out, aux_loss, load = self.mlp(self.post_attention_layernorm(x))
        return x + mlp_out, aux_loss, load


class MoEPreTrainedModel(PreTrainedModel):
    config_class = MoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, MoEFeedForward):
            for p in (module.gate_proj, module.up_proj, module.down_proj):
                p.normal_(0.0, std)
        elif isinstance(module, nn.RMSNorm):
            module.weight.fill_(1.0)


class MoEModel(MoEPreTrainedModel):
    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Cache | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the final hidden states, the mean balance loss, and the expert load [layers, experts].

        Args:
            attention_mask: [batch, cached + new tokens], 1 for tokens, 0 for padding (generation).
            position_ids: [batch, new tokens]; default: from ``attention_mask``, else after the cache.
            cache: the KV cache, updated in place.
        """
        x = self.embed_tokens(input_ids)
        seq = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
        elif position_ids is None and past:
            position_ids = torch.arange(past, past + seq, device=x.device).expand(x.shape[0], seq)
        cos, sin = rotary_cos_sin(seq, self.config.head_dim, self.config.rope_theta, x.device, x.dtype, position_ids)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_bias(attention_mask, seq, x.dtype)
        elif attention_mask is not None:  # a ready 4D mask (static caches)
            mask = attention_mask
        elif past and seq > 1:  # new tokens after a cache: causal with an offset
            mask = attention_bias(torch.ones(x.shape[0], past + seq, device=x.device), seq, x.dtype)
        aux_total = x.new_zeros((), dtype=torch.float32)
        loads = []
        for layer in self.layers:
            x, aux_loss, load = layer(x, cos, sin, mask=mask, cache=cache)
            aux_total = aux_total + aux_loss
            loads.append(load)
        return self.norm(x), aux_total / len(self.layers), torch.stack(loads)


class MoEForCausalLM(MoEPreTrainedModel, GenerationMixin):
    """Causal LM head on :class:`MoEModel`. ``labels`` are the input ids; the shift happens inside.
    ``generate()`` is transformers' (greedy, sampling, beam search, stopping at EOS) with a KV cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoEConfig):
        super().__init__(config)
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> MoECausalLMOutput:
        """``cache``/``past_key_values`` (transformers' new and old names) carry the KV cache between
        calls; ``use_cache=True`` without one starts a fresh cache; ``logits_to_keep=N`` computes the
        logits of the last N positions only (what generation needs)."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden, aux_loss, expert_load = self.model(input_ids, attention_mask=attention_mask,
                                                   position_ids=position_ids, cache=cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = lm_loss = None
        if labels is not None:
            lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                      labels[:, 1:].reshape(-1), ignore_index=-100)
            loss = lm_loss + self.config.router_aux_loss_coef * aux_loss
        out = MoECausalLMOutput(loss=loss, logits=logits, lm_loss=lm_loss, aux_loss=aux_loss, expert_load=expert_load)
        if cache is not None:  # not a dataclass field: its name depends on the transformers version
            out[CACHE_KEY] = cache
        return out


def count_parameters(model: nn.Module, config: MoEConfig) -> dict[str, int]:
    """Total and active (used per token) parameter counts; works on a meta-device model.

    Returns:
        ``{"total": ..., "active": ..., "experts": ...}`` where ``experts`` counts routed-expert weights.
    """
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for m in model.modules() if isinstance(m, MoEFeedForward)
                  for p in (m.gate_proj, m.up_proj, m.down_proj))
    inactive = experts * (config.num_experts - config.num_experts_per_tok) // config.num_experts
    return {"total": total, "active": total - inactive, "experts": experts}


def parameter_counts(config: MoEConfig) -> dict[str, int]:
    """:func:`count_parameters` of the model ``config`` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return count_parameters(MoEForCausalLM(config), config)
