"""Steps/s of our Trainer vs a bare PyTorch loop on the same tiny model, optimizers, data and batch.

    python benchmarks/step_overhead.py [--steps 60] [--rounds 5]

The two alternate in blocks of --steps inside one process (same threads, same caches), and the
median block time of each is compared. Target: trainer / bare >= 0.97 (logging every 10 steps,
token counting, EMA, stop-signal check and checkpoint bookkeeping cost at most 3%).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logging_steps", type=int, default=10, help="the trainer logs every N steps, as a run does")
    args = parser.parse_args()

    from accel_trainer.models.presets import PRESETS

    from accel_trainer.config import DataArguments, TrainingArguments
    from accel_trainer.data import build_datasets, build_train_dataloader
    from accel_trainer.models import MoEConfig, MoEForCausalLM
    from accel_trainer.optim import OptimizerSettings, build_optimizers, lr_multiplier
    from accel_trainer.trainer import Trainer, build_accelerator

    import tempfile

    out = tempfile.mkdtemp(prefix="overhead-")
    train_args = TrainingArguments(output_dir=out, max_steps=10**6, per_device_train_batch_size=8, eval_steps=0,
                                   logging_steps=args.logging_steps, report_to="none", disable_tqdm=True)
    data = build_datasets(DataArguments(max_corpus_bytes=500_000), seed=0, output_dir=out, block_size=128,
                          progress=False)
    settings = OptimizerSettings(muon_lr=0.02, adamw_lr=3e-3)
    accelerator = build_accelerator(train_args)

    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(**PRESETS["tiny"]))
    trainer = Trainer(accelerator, model, build_optimizers(model, settings), data, train_args, run_config={})
    trainer.metrics.log = lambda *a, **k: None  # keep the disk out of the comparison; the rest runs
    batches = trainer.micro_batches()
    from tqdm.auto import tqdm

    progress = tqdm(disable=True)  # the trainer's own bar, hidden as with --disable_tqdm

    torch.manual_seed(0)
    bare_model = MoEForCausalLM(MoEConfig(**PRESETS["tiny"]))
    bare_opt = build_optimizers(bare_model, settings)
    loader = build_train_dataloader(data.train, 8)

    def bare_batches():
        while True:
            yield from loader

    bare_iter = bare_batches()

    def run_trainer(n):
        for _ in range(n):
            trainer.after_step(*trainer.train_step(next(batches)), progress)
            trainer.checkpointer.stop_requested()

    def run_bare(n):
        for step in range(n):
            ids = next(bare_iter)["input_ids"]
            bare_model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 1.0)
            bare_opt.set_lr(lr_multiplier(step, kind="cosine", warmup_steps=10, total_steps=10**6))
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    run_trainer(5)
    run_bare(5)  # warm-up
    times = {"trainer": [], "bare": []}
    for _ in range(args.rounds):
        for name, fn in (("trainer", run_trainer), ("bare", run_bare)):
            start = time.perf_counter()
            fn(args.steps)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'loop':<10}{'steps/s':>10}   (median of {args.rounds} blocks of {args.steps} steps)")
    for name in ("bare", "trainer"):
        print(f"{name:<10}{args.steps / med[name]:>10.2f}")
    print(f"\nratio trainer/bare steps/s: {med['bare'] / med['trainer']:.3f}  (target >= 0.97)")
    print(f"trainer steps run: {trainer.state.global_step}, logging steps among them: "
          f"{trainer.state.global_step // args.logging_steps}")


if __name__ == "__main__":
    main()
