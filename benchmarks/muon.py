"""Newton-Schulz work per rank under FSDP2: before (every rank orthogonalised every gathered matrix)
vs now (each gathered matrix by one owner rank, balanced), side by side, from the preset's shapes.

    python benchmarks/muon.py [--preset 18b] [--world_sizes 8 64 256]

Stacked expert weights are sharded on the expert dimension, so each rank orthogonalises its own
experts in both cases; the other matrices (attention, shared expert) are gathered. Work is counted
in FLOPs (Newton-Schulz's five quintic iterations), and as seconds at --tflops of bf16 throughput.
The distributed result equals the single-process optimizer bitwise (tests/integration/test_fsdp2.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="18b")
    parser.add_argument("--world_sizes", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tflops", type=float, default=400.0, help="sustained bf16 TFLOP/s of one GPU")
    args = parser.parse_args()

    from accel_trainer.models.presets import PRESETS

    from accel_trainer.models import MoEConfig, MoEForCausalLM
    from accel_trainer.optim import _Owners, newton_schulz_flops, split_parameters

    config = MoEConfig(**PRESETS[args.preset])
    with torch.device("meta"):
        model = MoEForCausalLM(config)
    muon, _ = split_parameters(model)
    experts = [tuple(p.shape) for _, p in muon if p.ndim == 3]
    gathered = [tuple(p.shape) for _, p in muon if p.ndim == 2]
    print(f"preset {args.preset}: {len(gathered)} gathered matrices, {len(experts)} stacked expert tensors "
          f"({config.num_experts} experts each)")
    print(f"{'ranks':>6}{'before TFLOP/rank':>19}{'now, max TFLOP/rank':>21}{'now, min':>10}{'less work':>11}"
          f"{'ms/step before':>16}{'ms/step now':>13}")
    for world in args.world_sizes:
        local_experts = math.ceil(config.num_experts / world)  # FSDP2 chunks dim 0 (the experts)
        expert_flops = sum(newton_schulz_flops((local_experts, *shape[1:])) for shape in experts)
        before = expert_flops + sum(newton_schulz_flops(shape) for shape in gathered)
        owners = _Owners()
        for shape in gathered:
            owners.pick(shape, world)
        now = [expert_flops + load for load in owners.load]
        print(f"{world:>6}{before / 1e12:>19.2f}{max(now) / 1e12:>21.2f}{min(now) / 1e12:>10.2f}"
              f"{before / max(now):>10.1f}x{before / (args.tflops * 1e9):>16.1f}"
              f"{max(now) / (args.tflops * 1e9):>13.1f}")


if __name__ == "__main__":
    main()
