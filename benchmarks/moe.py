"""MoE layer speed: forward+backward of our top-k MoE vs a dense SwiGLU FFN with the same active
parameters (hidden width k x expert width), on the same tokens, side by side in one run.

    python benchmarks/moe.py [--tokens 4096 --hidden 256 --expert 256 --experts 8 --top_k 2]
    python benchmarks/moe.py --device cuda --dtype bf16 --tokens 16384 --hidden 2048 --expert 1408 --experts 64 --top_k 6

Target on CPU: MoE / dense time <= 1.5. On CUDA it also prints tokens/s.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert", type=int, default=256, help="intermediate width of one expert")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    from accel_trainer.models import MoEConfig
    from accel_trainer.models.modeling_moe import MoEFeedForward, SwiGLU

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

    def run_moe():
        out, aux = moe(x)
        (out.float().square().mean() + aux).backward()

    def run_dense():
        dense(x).float().square().mean().backward()

    active_moe = args.top_k * 3 * args.hidden * args.expert + args.hidden * args.experts
    active_dense = sum(p.numel() for p in dense.parameters())
    t_moe, t_dense = bench(run_moe, device, args.repeats), bench(run_dense, device, args.repeats)
    print(f"device {device}, {args.dtype}, {args.tokens} tokens, hidden {args.hidden}, "
          f"{args.experts} experts x {args.expert} (top-{args.top_k})")
    print(f"{'layer':<8}{'active params':>15}{'fwd+bwd ms':>12}{'tokens/s':>14}")
    print(f"{'dense':<8}{active_dense:>15,}{t_dense * 1e3:>12.2f}{args.tokens / t_dense:>14,.0f}")
    print(f"{'moe':<8}{active_moe:>15,}{t_moe * 1e3:>12.2f}{args.tokens / t_moe:>14,.0f}")
    print(f"\nratio moe/dense time: {t_moe / t_dense:.2f}  (target <= 1.5 on CPU)")


if __name__ == "__main__":
    main()
