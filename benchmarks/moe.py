"""MoE layer speed, side by side in one run: the experts as grouped matmuls (F.grouped_mm) vs a loop
over experts, the whole MoE layer vs a dense SwiGLU FFN with the same active parameters
(hidden width k x expert width), and a transformers MoE block (Qwen3-MoE's, the same shape) with its
own experts (``experts_implementation`` eager and grouped_mm) vs on our engine (accel_trainer);
forward+backward on the same tokens.

    python benchmarks/moe.py [--tokens 4096 --hidden 256 --expert 192 --experts 64 --top_k 6]
    python benchmarks/moe.py --tokens 4096 --hidden 256 --expert 96 --experts 128 --top_k 8   # Qwen3-30B-A3B's routing
    python benchmarks/moe.py --device cuda --dtype bf16 --tokens 16384 --hidden 2048 --expert 1536 \
        --experts 64 --top_k 6                                                                 # the 18b layer
    python benchmarks/moe.py --device cuda --dtype bf16 --tokens 16384 --hidden 2048 --expert 768 \
        --experts 128 --top_k 8                                                                # Qwen3-30B-A3B's layer

The default is the 18b preset's routing (64 experts, top-6, expert width 3/4 of the hidden size)
at a width a CPU runs in seconds; the second line is the 18b preset's layer itself (bf16, GPU).
Targets: experts grouped >= 1.5x faster than the loop on CPU; MoE layer / dense time <= 1.15 on CPU
at the default shape, <= 1.2 at the 18b shape on a GPU (bf16); the transformers block on our engine
no slower than on its own grouped_mm on CPU, >= 2x on a GPU (compiled, in a whole model:
scripts/gpu_check.sh). The layer's own work (router, top-k,
one gather in, one gather out, the weighted sum) is the layer's time minus the experts' alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def bench(fn, device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def transformers_blocks(args, device, dtype) -> dict:
    """Qwen3-MoE's block of this shape (router, top-k, experts), the same weights, on each experts kernel."""
    import copy

    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from accel_trainer.models.hf_moe import ENGINE, register_engine

    register_engine()
    config = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.expert, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, norm_topk_prob=True)
    torch.manual_seed(1)
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    blocks = {}
    for kind in ("eager", "grouped_mm", ENGINE):
        one = copy.deepcopy(block)  # its own config too: the kernel is read from it at every call
        one.experts.config._experts_implementation = kind
        blocks[kind] = one.to(device, dtype)
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert", type=int, default=192, help="intermediate width of one expert")
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    from accel_trainer.models import MoEConfig
    from accel_trainer.models import modeling_moe
    from accel_trainer.models.modeling_moe import MoEFeedForward, SwiGLU, experts_forward

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    config = MoEConfig(hidden_size=args.hidden, moe_intermediate_size=args.expert, num_experts=args.experts,
                       num_experts_per_tok=args.top_k, num_attention_heads=1, num_key_value_heads=1,
                       shared_expert_intermediate_size=0)
    torch.manual_seed(0)
    moe = MoEFeedForward(config)
    for p in (moe.gate_proj, moe.up_proj, moe.down_proj):
        torch.nn.init.normal_(p, std=0.02)
    dense = SwiGLU(args.hidden, args.top_k * args.expert)
    moe, dense = moe.to(device, dtype), dense.to(device, dtype)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)

    # The experts alone, on rows already sorted by expert; one expert gets no rows (a real case).
    slots = args.tokens * args.top_k
    sizes = torch.full((args.experts,), slots // (args.experts - 1), dtype=torch.int64)
    sizes[0], sizes[-1] = 0, slots - sizes[1:-1].sum()
    offsets = sizes.cumsum(0).to(device=device, dtype=torch.int32)
    rows = torch.randn(slots, args.hidden, device=device, dtype=dtype, requires_grad=True)

    def experts(grouped: bool):
        def run():
            out = experts_forward(rows, offsets, moe.gate_proj, moe.up_proj, moe.down_proj, grouped=grouped)
            out.float().square().mean().backward()
        return run

    def run_layer():
        out, aux, _ = moe(x)
        (out.float().square().mean() + aux).backward()

    def run_dense():
        dense(x).float().square().mean().backward()

    grouped_ok = modeling_moe.grouped_mm_works(device, dtype)
    blocks = transformers_blocks(args, device, dtype)

    def run_block(block):
        def run():
            block(x[None]).float().square().mean().backward()
        return run

    times = {"experts, grouped": bench(experts(True), device, args.repeats) if grouped_ok else float("nan"),
             "experts, loop": bench(experts(False), device, args.repeats),
             "moe layer": bench(run_layer, device, args.repeats),
             "dense ffn": bench(run_dense, device, args.repeats),
             **{f"hf block, {kind}": bench(run_block(block), device, args.repeats) for kind, block in blocks.items()}}
    active_moe = args.top_k * 3 * args.hidden * args.expert + args.hidden * args.experts
    active_dense = sum(p.numel() for p in dense.parameters())
    print(f"device {device}, {args.dtype}, {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts x "
          f"{args.expert} (top-{args.top_k}; expert 0 gets no tokens in the experts-alone rows)")
    print(f"{'fwd+bwd':<26}{'active params':>15}{'ms':>10}{'tokens/s':>14}")
    for name, t in times.items():
        params = active_dense if name == "dense ffn" else active_moe
        print(f"{name:<26}{params:>15,}{t * 1e3:>10.2f}{args.tokens / t:>14,.0f}")
    layer_kind = "grouped_mm" if grouped_ok else "the expert loop (grouped_mm refuses this device/dtype)"
    print(f"\nratio experts loop/grouped time: {times['experts, loop'] / times['experts, grouped']:.2f}  "
          f"(target >= 1.5 on CPU)")
    print(f"ratio moe/dense time: {times['moe layer'] / times['dense ffn']:.2f}  (target <= 1.15 on CPU, <= 1.2 at "
          f"the 18b shape on a GPU; the layer uses {layer_kind})")
    theirs = times["hf block, grouped_mm"]
    print(f"ratio hf block own grouped_mm / on our engine time: {theirs / times['hf block, accel_trainer']:.2f}  "
          f"(target >= 1.0 on CPU: ours no slower; eager / ours: "
          f"{times['hf block, eager'] / times['hf block, accel_trainer']:.2f})")
    if grouped_ok:
        print(f"ratio experts alone/dense time: {times['experts, grouped'] / times['dense ffn']:.2f}  (the grouped "
              f"GEMMs "
              f"against one dense GEMM of the same FLOPs); routing, gathers and the weighted sum: "
              f"{(times['moe layer'] - times['experts, grouped']) / times['moe layer']:.0%} of the layer's time")


if __name__ == "__main__":
    main()
