"""A memory and checkpoint plan before spending GPU hours: per-GPU memory under FSDP2 (full
sharding), whether it fits, and what checkpoints cost, from the model config alone (meta device).

Per GPU, with W GPUs:
* parameters: fp32 master weights, sharded (4 B / W per parameter); plus the layers FSDP2 gathers
  for compute, in the compute dtype (the largest layer, twice: the one running and the one prefetched),
  and the root unit (embeddings, head) while it runs;
* gradients: fp32, sharded (4 B / W), plus one gathered layer's gradients before they are reduced;
* optimizer state, sharded: Muon's momentum (4 B per Muon parameter), AdamW's two moments (8 B);
  plus Newton-Schulz scratch for the largest matrix a rank orthogonalises (five copies of it);
* activations of one micro-batch, counted tensor by tensor from what this model's forward keeps
  for the backward (see :func:`activation_elements_per_token`); with activation checkpointing only
  each layer's input is kept, plus one layer's activations while it is recomputed;
* a reserve for the CUDA allocator's fragmentation and the runtime (``overhead_fraction``).

With expert parallelism (``expert_parallel_size`` e > 1, our MoE family) the expert stacks are not
FSDP-sharded: each GPU keeps ``1/e`` of them whole (fp32 weights, gradients and Muon momentum), casts
one layer's share to the compute dtype while it runs, and holds the token rows it sends and receives.

Traffic per GPU per micro-batch for the experts (:attr:`Plan.traffic`, bytes received; ring
collectives move ``(n-1)/n`` of the data): FSDP2 alone all-gathers every expert weight in the forward
and again in the backward (a third time when activation checkpointing recomputes the forward) and
reduce-scatters their fp32 gradients; expert parallelism instead sends each routed token row to its
expert's GPU and back, in the forward and again (as gradients) in the backward, and all-reduces the
expert gradients over the ``W/e`` GPUs that hold the same experts. Everything else moves the same
bytes either way.
"""

from __future__ import annotations

from dataclasses import dataclass


GIB = 2**30


def activation_elements_per_token(config, gradient_checkpointing: bool = False) -> dict[str, float]:
    """Elements kept for the backward per token: per layer, and for the head (final norm, logits and
    the loss's log-probabilities, which are fp32).

    Per layer (d hidden, h heads, g key/value heads, q head width, E experts, k active, f expert
    width, s shared-expert width): the two norms' inputs and outputs (4d); queries, keys and values
    before and after RoPE, the attention output and its reshaped copy (4hq + 3gq) and the softmax
    statistics (h); the router's probabilities (E); the k gathered rows and the k outputs of the
    experts (2kd); gate, up, their SwiGLU product and activation per routed slot (4kf); the same four
    for the shared expert (4s). A dense model is one expert always used (k = 1, f its MLP width).
    """
    from .models import ModelShape
    from .models import first_attr

    shape = ModelShape.of(config)
    d, h, q = shape.hidden_size, shape.num_heads, shape.head_dim
    g = first_attr(config, "num_key_value_heads", default=h)
    e, k = shape.num_experts, shape.experts_per_token or 1
    f = first_attr(config, "moe_intermediate_size") if e else first_attr(config, "intermediate_size", "n_inner",
                                                                         default=4 * d)
    f = f or 4 * d
    s = first_attr(config, "shared_expert_intermediate_size", default=0) if e else 0
    layer = 4 * d + 4 * h * q + 3 * g * q + h + e + 2 * k * d + 4 * k * f + 4 * s
    head = 2 * d + 2 * config.vocab_size
    kept = shape.num_layers * (d if gradient_checkpointing else layer)
    # Checkpointing recomputes one layer at a time in the backward: that layer's activations come back.
    return {"layers": kept + (layer if gradient_checkpointing else 0), "head": head, "layer": layer}


@dataclass
class Plan:
    """The plan's figures, in bytes per GPU unless named otherwise."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    reserve: float
    gpu_memory: float
    checkpoint_bytes: float
    checkpoint_bytes_per_rank: float
    save_seconds: float
    counts: dict
    traffic: dict  # expert bytes received per GPU per micro-batch, by collective (see the module docstring)

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory


def _parameter_groups(config):
    """(all, per-layer max, root unit, Muon, AdamW, largest non-expert matrix) parameter counts, from
    a model built on the meta device (any architecture: ours, or a transformers one)."""
    from .efficiency import decoder_layers
    from .models import build_on_meta, family_of
    from .optim import split_parameters

    model = build_on_meta(config)
    total = sum(p.numel() for p in model.parameters())
    layers = decoder_layers(model, getattr(model, "_no_split_modules", None) or ())
    layer = max((sum(p.numel() for p in m.parameters()) for m in layers), default=total)
    root = total - sum(p.numel() for m in layers for p in m.parameters())
    muon, adamw = split_parameters(model, rule=family_of(config).parameter_rule)
    largest_matrix = max((p.numel() for _, p in muon if p.ndim == 2), default=0)
    return (total, layer, root, sum(p.numel() for _, p in muon), sum(p.numel() for _, p in adamw), largest_matrix)


def _expert_parameters(config) -> tuple[int, int]:
    """(routed-expert parameters in all layers, those of the largest layer), as the model's family
    counts them for expert parallelism; (0, 0) for a family without it."""
    from .models import family_of

    family = family_of(config)
    return family.routed_expert_parameters(config) if family.routed_expert_parameters else (0, 0)


def plan(config, num_gpus: int, gpu_memory_gib: float, per_device_batch: int, block_size: int,
         gradient_checkpointing: bool = False, mixed_precision: str = "bf16", disk_gbps: float = 2.0,
         overhead_fraction: float = 0.1, expert_parallel_size: int = 1) -> Plan:
    """The memory of one GPU and the checkpoint's size and save time for this setup.

    Args:
        config: the model's config (any registered family's, or any transformers causal LM's).
        num_gpus: GPUs sharing the model (FSDP2 full sharding over all of them).
        gpu_memory_gib: memory of one GPU.
        per_device_batch: sequences per GPU per micro-batch; ``block_size`` tokens each.
        gradient_checkpointing: keep only each layer's input for the backward.
        mixed_precision: ``bf16``/``fp16`` computes (and gathers layers) in 2 bytes, ``no`` in 4.
        disk_gbps: aggregate write bandwidth of the checkpoint storage, GB/s.
        overhead_fraction: share of the GPU kept for the allocator's fragmentation and the runtime.
        expert_parallel_size: GPUs sharing one copy of the experts (families with ``ep``; divides
            ``num_gpus`` and the number of experts); 1 shards the experts with FSDP2 like the rest.
    """
    total, layer, root, muon, adamw, largest_matrix = _parameter_groups(config)
    w, e = num_gpus, expert_parallel_size
    experts, layer_experts = _expert_parameters(config)
    compute_bytes = 4 if mixed_precision == "no" else 2
    elements = activation_elements_per_token(config, gradient_checkpointing)
    tokens = per_device_batch * block_size
    activations = tokens * (compute_bytes * elements["layers"] + 4 * elements["head"])
    sharded = total - (experts if e > 1 else 0)  # what FSDP2 shards over all W GPUs
    gathered = layer - (layer_experts if e > 1 else 0)  # what it gathers per layer
    parameters = 4 * sharded / w + compute_bytes * (2 * gathered + root)
    gradients = 4 * sharded / w + 4 * gathered
    optimizer = (4 * (muon - (experts if e > 1 else 0)) + 8 * adamw) / w + 5 * 4 * largest_matrix
    # Token rows sent and received for each routed slot (per layer kept for the backward).
    k, d = (config.num_experts_per_tok, config.hidden_size) if experts else (0, 0)
    rows = tokens * k * d * compute_bytes
    if e > 1:
        parameters += 4 * experts / e + compute_bytes * layer_experts / e
        gradients += 4 * experts / e
        optimizer += 4 * experts / e  # Muon's momentum of this GPU's experts
        activations += 2 * rows * (1 if gradient_checkpointing else config.num_hidden_layers)
    gathers = 3 if gradient_checkpointing else 2  # forward, backward (and the recomputed forward)
    layers = getattr(config, "num_hidden_layers", 0)
    traffic = ({"all_gather": gathers * experts * compute_bytes * (w - 1) / w,
                "reduce_scatter": 4 * experts * (w - 1) / w} if e == 1 else
               {"all_to_all": (2 * gathers) * rows * layers * (e - 1) / e,
                "all_reduce": 2 * 4 * experts / e * (w // e - 1) / (w // e)}) if experts else {}
    checkpoint = 4 * total + 4 * muon + 8 * adamw
    gpu_memory = gpu_memory_gib * GIB
    return Plan(parameters=parameters, gradients=gradients, optimizer=optimizer, activations=activations,
                reserve=overhead_fraction * gpu_memory, gpu_memory=gpu_memory, checkpoint_bytes=checkpoint,
                checkpoint_bytes_per_rank=checkpoint / w, save_seconds=checkpoint / (disk_gbps * 1e9),
                counts={"total": total, "muon": muon, "adamw": adamw, "largest_layer": layer, "experts": experts},
                traffic=traffic)


def smallest_gpu_count(config, gpu_memory_gib: float, per_device_batch: int, block_size: int, **kwargs) -> int | None:
    """The fewest GPUs (powers of two up to 4096) on which the plan fits."""
    n = 1
    while n <= 4096:
        if plan(config, n, gpu_memory_gib, per_device_batch, block_size, **kwargs).fits:
            return n
        n *= 2
    return None
