"""Training speed of the 18b preset's layers on one device: tokens/s, MFU and peak memory for eager and
compiled layers, with and without activation checkpointing, side by side in one run; and where an
eager step's time goes (attention, experts, router + permutation, optimizer), from torch.profiler.

    python benchmarks/mfu.py                      # the 18b shapes, 4 layers, 1 x 4096 tokens, bf16 (a GPU)
    python benchmarks/mfu.py --preset tiny --layers 2 --block_size 64 --batch_size 2 --steps 2 --warmup 1

Every layer has the preset's real shape (hidden 2048, 64 experts of 1536, top-6, a shared expert,
16 heads); only their number is cut so that the weights, gradients and Muon/AdamW state fit one GPU.
MFU counts the model FLOPs of a token (``6 x active parameters + attention``, telemetry.py) against
the device's dense bf16 peak (none on a CPU: MFU is not printed there).

The profile: forward ranges are put around each attention block, each MoE block and the experts
inside it; a backward op counts where its forward op was (autograd's sequence numbers link them);
the optimizers' steps are their own ranges. "router + permutation" is the MoE block less its experts.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

VARIANTS = ("eager", "compiled", "eager+AC", "compiled+AC")
BACKWARD = "autograd::engine::evaluate_function: "


def build(args, device, dtype, compiled: bool, checkpointing: bool):
    """The model (the preset's layers, ``--layers`` of them) and its Muon + AdamW optimizers."""
    from accel_trainer.efficiency import compile_decoder_layers, enable_activation_checkpointing
    from accel_trainer.models import MoEConfig, MoEForCausalLM
    from accel_trainer.models.modeling_moe import grouped_mm_works
    from accel_trainer.models.presets import PRESETS
    from accel_trainer.optim import OptimizerSettings, assign_parameters, build_optimizers

    config = MoEConfig(**{**PRESETS[args.preset], "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = MoEForCausalLM(config)
    if checkpointing:
        enable_activation_checkpointing(model)
    if compiled:
        grouped_mm_works(device, dtype)  # the experts' kernel is chosen eagerly, before tracing
        compile_decoder_layers(model)
    optimizers = build_optimizers(model, OptimizerSettings(muon_lr=0.02, adamw_lr=3e-3), assign_parameters(model))
    return config, model, optimizers


def train_step(model, optimizers, ids, device, dtype):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizers.step()
    optimizers.zero_grad(set_to_none=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args, device, dtype, variant: str) -> dict:
    """Tokens/s (median step), MFU and peak memory of one variant."""
    from accel_trainer.models import count_parameters
    from accel_trainer.telemetry import flops_per_token, peak_memory, peak_tflops

    config, model, optimizers = build(args, device, dtype, "compiled" in variant, "AC" in variant)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), device=device)
    for _ in range(args.warmup):  # compilation, the allocator's pools, the kernels' autotuning
        train_step(model, optimizers, ids, device, dtype)
    peak_memory(device)  # resets CUDA's peak: what follows is the steady state
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(model, optimizers, ids, device, dtype)
        synchronize(device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens = args.batch_size * args.block_size
    active = count_parameters(model, config)["active"]
    flops = flops_per_token(active, config.num_hidden_layers, config.num_attention_heads, config.head_dim,
                            args.block_size)
    peak = peak_tflops(device, args.peak_tflops)
    memory = next(iter(peak_memory(device).values()))
    del model, optimizers
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_ms": step * 1e3, "tokens_per_s": tokens / step,
            "mfu": tokens / step * flops / (peak * 1e12) if peak else None, "memory_gib": memory}


class _Range:
    """A profiler range opened by a module's forward pre-hook and closed by its forward hook."""

    def __init__(self, name: str):
        self.name, self.open = name, []

    def enter(self, module, inputs):
        rf = torch.autograd.profiler.record_function(self.name)
        rf.__enter__()
        self.open.append(rf)

    def exit(self, module, inputs, output):
        self.open.pop().__exit__(None, None, None)


def _category(event, ranges: set[str]) -> str | None:
    while event is not None:
        if event.name in ranges:
            return event.name
        event = event.cpu_parent
    return None


def profile_shares(args, device, dtype) -> dict[str, float]:
    """Share of an eager step's time per part, from one profiled step after the warm-up."""
    from torch.profiler import ProfilerActivity, profile

    from accel_trainer.models import modeling_moe

    config, model, optimizers = build(args, device, dtype, compiled=False, checkpointing=False)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.block_size), device=device)
    ranges = {"attention": _Range("attention"), "moe": _Range("moe")}
    for module in model.modules():
        part = ("attention" if isinstance(module, modeling_moe.Attention)
                else "moe" if isinstance(module, modeling_moe.MoEFeedForward) else None)
        if part:
            module.register_forward_pre_hook(ranges[part].enter)
            module.register_forward_hook(ranges[part].exit)
    plain = modeling_moe.experts_forward

    def experts_forward(*a, **kw):  # the experts, inside the MoE block's range
        with torch.autograd.profiler.record_function("experts"):
            return plain(*a, **kw)

    modeling_moe.experts_forward = experts_forward
    try:
        for _ in range(max(args.warmup, 1)):
            train_step(model, optimizers, ids, device, dtype)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        synchronize(device)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            train_step(model, optimizers, ids, device, dtype)
            synchronize(device)
        wall = time.perf_counter() - start
    finally:
        modeling_moe.experts_forward = plain
    cuda = device.type == "cuda"

    def took(event) -> float:  # seconds on the device (its kernels) or on the CPU
        return (event.device_time_total if cuda else event.cpu_time_total) / 1e6

    names = {"attention", "moe", "experts"}
    events = prof.events()
    seconds = dict.fromkeys(("attention", "experts", "router + permutation", "optimizer"), 0.0)
    of_sequence = {}
    for event in events:  # forward: the ranges, and which range each autograd-recorded op ran in
        if event.name in names:
            part = {"moe": "router + permutation"}.get(event.name, event.name)
            seconds[part] += took(event)
            if event.name == "experts":
                seconds["router + permutation"] -= took(event)
        elif event.sequence_nr >= 0 and not event.name.startswith(BACKWARD):
            part = _category(event, names)
            if part is not None:
                of_sequence.setdefault(event.sequence_nr, part)
        elif event.name.startswith("Optimizer.step#"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("Optimizer.step#"):
                parent = parent.cpu_parent
            if parent is None:  # the outermost optimizer step (the container's, not its children's)
                seconds["optimizer"] += took(event)
    for event in events:  # backward: an op counts where its forward op was
        if event.name.startswith(BACKWARD) and event.sequence_nr in of_sequence:
            part = {"moe": "router + permutation"}.get(of_sequence[event.sequence_nr], of_sequence[event.sequence_nr])
            seconds[part] += took(event)
    del model, optimizers
    gc.collect()
    total = wall if not cuda else max(wall, sum(seconds.values()))
    shares = {part: s / total for part, s in seconds.items()}
    shares["other (projections, embeddings, loss, idle)"] = max(0.0, 1 - sum(shares.values()))
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="18b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (of the preset's shape)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--block_size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (the median is shown)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's dense bf16 peak (default: known "
                                                                        "GPUs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))

    print(f"preset {args.preset} shapes, {args.layers} layers, {args.batch_size} x {args.block_size} tokens per step, "
          f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{str(dtype).replace('torch.', '')}, Muon + AdamW, median of {args.steps} steps after {args.warmup}")
    print(f"{'variant':<14}{'step ms':>10}{'tokens/s':>12}{'MFU':>8}{'peak memory GiB':>18}")
    results = {}
    for variant in args.variants:
        r = results[variant] = measure(args, device, dtype, variant)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{variant:<14}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12,.0f}{mfu:>8}{r['memory_gib']:>18.2f}",
              flush=True)
    if "eager" in results and "compiled" in results:
        print(f"ratio compiled/eager tokens/s: "
              f"{results['compiled']['tokens_per_s'] / results['eager']['tokens_per_s']:.2f}")
    shares = profile_shares(args, device, dtype)
    print("share of an eager step's time (torch.profiler):")
    for part, share in shares.items():
        print(f"  {part:<44}{share:>7.1%}")


if __name__ == "__main__":
    main()
