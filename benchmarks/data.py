"""The data path, side by side in one run:

1. prepare-data tokens/s with a trained byte-level BPE vs a plain ``datasets.map`` of the same
   tokenizer over the same documents (same number of processes);
2. the training loader's tokens/s from prepared shards (memory-mapped, permuted order) vs what one
   GPU of the 18b preset consumes (assumption: 40% MFU on an H100, 989 TFLOP/s dense bf16, 4096-token
   sequences);
3. time from a resume to the first batch at sample positions 10^3, 10^6, 10^9: ours (the position
   is a number, the sampler starts there) vs Accelerate's skip_first_batches on the same loader
   (which walks the skipped batches; measured up to 10^6 and extrapolated, as 10^9 would take hours).

    python benchmarks/data.py [--corpus_bytes 20000000] [--num_proc 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class LargeSource:
    """A stand-in for a prepared source of ``n`` blocks (the loader code runs unchanged): block ``b``
    is a slice of a small real token array, so any position exists without terabytes on disk."""

    def __init__(self, real, n: int):
        self.real, self.num_train, self.num_validation, self.path = real, n, 0, real.path

    def block(self, b: int):
        return self.real.block(b % self.real.num_train)

    def item(self, b: int) -> dict:
        return self.real.item(b % self.real.num_train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus_bytes", type=int, default=20_000_000)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=4096)
    args = parser.parse_args()

    from accelerate import Accelerator, skip_first_batches

    from accel_trainer.checkpoint import ResumableLoader
    from accel_trainer.config import DataArguments
    from accel_trainer.data import (TokenBlocks, TrainBlocks, build_train_dataloader, load_raw_text, prepare,
                                    train_tokenizer)
    from accel_trainer.telemetry import flops_per_token
    from accel_trainer.models.presets import PRESETS

    work = Path(tempfile.mkdtemp(prefix="data-bench-"))
    raw = load_raw_text(DataArguments(max_corpus_bytes=args.corpus_bytes))
    tokenizer = train_tokenizer(raw["text"], args.vocab_size, show_progress=False)
    tokenizer.save_pretrained(work / "tok")

    # 1. preparation
    start = time.perf_counter()
    manifest = prepare(raw, "text", tokenizer, work / "prepared", {"bench": 1}, num_proc=args.num_proc,
                       progress=False)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    mapped = raw.map(lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                     batched=True, num_proc=args.num_proc, remove_columns=["text"], load_from_cache_file=False)
    plain = time.perf_counter() - start
    total = manifest["total_tokens"]
    assert sum(len(x) for x in mapped["ids"]) + manifest["total_documents"] == total
    print(f"1. prepare {len(raw):,} documents ({args.corpus_bytes / 1e6:.0f} MB of text, {total:,} tokens), "
          f"{args.num_proc} processes, BPE of {args.vocab_size} ids")
    print(f"   {'method':<38}{'seconds':>9}{'tokens/s':>13}")
    print(f"   {'accel-trainer prepare-data':<38}{ours:>9.2f}{total / ours:>13,.0f}")
    print(f"   {'datasets.map(tokenizer), same procs':<38}{plain:>9.2f}{total / plain:>13,.0f}")
    print(f"   ratio prepare-data / datasets.map tokens/s: {plain / ours:.2f}")

    # 2. loader throughput
    source = TokenBlocks(work / "prepared", args.block_size, 0.01)
    if source.num_train < args.batch_size:
        source = TokenBlocks(work / "prepared", 256, 0.01)
    block = source.block_size
    loader = Accelerator(cpu=True).prepare(build_train_dataloader(TrainBlocks([source], seed=0), args.batch_size))
    batches = min(50, len(loader))

    def read():
        for _, batch in zip(range(batches), loader):
            batch["input_ids"].sum()
    rate = batches * args.batch_size * block / seconds(read)
    c = PRESETS["18b"]
    active = 2.64e9  # accel-trainer params: active parameters per token of the 18b preset
    need = 0.40 * 989e12 / flops_per_token(active, c["num_hidden_layers"], c["num_attention_heads"],
                                           c["hidden_size"] // c["num_attention_heads"], 4096)
    print(f"\n2. training loader from prepared shards, {args.batch_size} x {block} tokens per batch, one process")
    print(f"   loader: {rate:,.0f} tokens/s; one H100 of the 18b preset at 40% MFU consumes {need:,.0f} tokens/s; "
          f"ratio {rate / need:.0f}x")

    # 3. resume at a position
    large = TrainBlocks([LargeSource(source, 2 * 10**9)], seed=0)
    print(f"\n3. seconds from a resume to the first batch (epoch of {len(large):,} samples, batch {args.batch_size})")
    print(f"   {'position':>12}{'ours':>10}{'skip_first_batches':>22}")
    skip_rate = None
    for position in (10**3, 10**6, 10**9):
        prepared_loader = Accelerator(cpu=True).prepare(build_train_dataloader(large, args.batch_size))
        resumable = ResumableLoader(prepared_loader)

        def ours_first():
            resumable.load_state_dict({"epoch": 0, "samples_in_epoch": position, "epoch_generator_state": None})
            next(iter(resumable))
        t_ours = seconds(ours_first)
        if position <= 10**6:
            def skip_first():
                next(iter(skip_first_batches(prepared_loader, position // args.batch_size)))
            t_skip = seconds(skip_first, repeats=1)
            skip_rate = position / t_skip
            skip_text = f"{t_skip:.3f}"
        else:
            skip_text = f"~{position / skip_rate:,.0f} (extrapolated)"
        print(f"   {position:>12,}{t_ours:>10.4f}{skip_text:>22}")


if __name__ == "__main__":
    main()
