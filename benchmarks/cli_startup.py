"""Wall time of the read-only ``accel-trainer`` verbs, against the cost of importing torch + transformers.

    python benchmarks/cli_startup.py [--repeats 5] [--run runs/demo]

Without ``--run`` it first trains nothing: it writes a small checkpoint of a tiny model with the
Checkpointer into a temporary run dir. Each verb is started as a fresh process (what a user types)
``--repeats`` times; the median is printed next to ``python -c "import torch, transformers"``.
Target: every verb under 1.5 s on the 2-core CI machine (it was ~12 s when the CLI imported torch
and transformers at start-up).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLI = [sys.executable, "-m", "accel_trainer.cli"]


def make_run(out: Path) -> Path:
    import torch
    from accelerate import Accelerator

    from accel_trainer.checkpoint import Checkpointer
    from accel_trainer.models import MoEConfig, MoEForCausalLM
    from accel_trainer.models.presets import PRESETS

    accelerator = Accelerator(cpu=True)
    model = MoEForCausalLM(MoEConfig(**PRESETS["tiny"]))
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt = Checkpointer(accelerator, out, model=model, optimizer=optimizer, save_total_limit=3)
    for step in (10, 20):
        ckpt.save(step, metrics={"val_loss": 5.0 - step / 100})
    return out


def timed(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", default=None, help="an existing run dir (default: write a small one)")
    args = parser.parse_args()
    run = Path(args.run) if args.run else make_run(Path(tempfile.mkdtemp(prefix="cli-startup-")) / "run")

    reference = timed([sys.executable, "-c", "import torch, transformers"], args.repeats)
    baseline = timed([sys.executable, "-c", "pass"], args.repeats)
    print(f"{'command':<44}{'median s':>10}{'vs import torch+transformers':>30}")
    print(f"{'python -c pass':<44}{baseline:>10.2f}{baseline / reference:>30.2f}")
    label = 'python -c "import torch, transformers"'
    print(f"{label:<44}{reference:>10.2f}{1.0:>30.2f}")
    for verb in (["list", str(run)], ["verify", str(run)], ["inspect", str(run)],
                 ["prune", str(run), "--keep", "1", "--dry_run"]):
        t = timed(CLI + verb, args.repeats)
        print(f"{'accel-trainer ' + verb[0]:<44}{t:>10.2f}{t / reference:>30.2f}  "
              f"{'OK' if t < 1.5 else 'OVER the 1.5 s target'}")


if __name__ == "__main__":
    main()
