"""Fine-tuning figures (issue #30), measured side by side in one run of the recipe's own code:

1. packing: rows and the share of real tokens, step time and the time for one epoch of the same
   conversations, one conversation per row vs packed (best fit);
2. LoRA vs full fine-tuning: bytes of a checkpoint's weights and optimizer state, step time;
3. the adapters' optimizer: LoRA with AdamW vs with Muon, each over a small learning-rate sweep, the
   validation loss (on the assistant's tokens) after the same steps.

    python benchmarks/fine_tuning.py [--conversations 400] [--steps 60] [--block_size 512]

The task is learnable from the context alone (the assistant repeats the user's words in reverse
order), on a small Llama from a config (random weights) with the byte tokenizer and a chat template
with {% generation %} markers. Everything runs on this machine's CPU threads; the ratios are what
to read.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEMPLATE = ("{%- for m in messages -%}"
            "{%- if m['role'] == 'assistant' -%}"
            "<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
            "{%- else -%}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{%- endif -%}{%- endfor -%}")
WORDS = ("red blue green sky sea sun moon star tree rock sand wind rain snow fire ice leaf bird fish wolf bear "
         "deer frog cat dog owl fox elk ant bee").split()


def write_conversations(path: Path, n: int, seed: int = 0) -> None:
    """Conversations of 1-3 exchanges; each answer is the question's words reversed."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"role": "system", "content": "reverse the words"}] if i % 4 == 0 else []
            for _ in range(rng.randint(1, 3)):
                words = rng.choices(WORDS, k=rng.randint(2, 12))
                turns += [{"role": "user", "content": " ".join(words)},
                          {"role": "assistant", "content": " ".join(reversed(words))}]
            f.write(json.dumps({"messages": turns}) + "\n")


def make_base(root: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from accel_trainer.data import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root / "base"


def train(root: Path, name: str, args, extra: list[str], steps: int) -> dict:
    """One run of the recipe in this process; its metrics and checkpoint sizes."""
    from accel_trainer.run import main as run_main

    out = root / name
    argv = ["--model_name_or_path", str(root / "base"), "--chat_data", str(root / "chat.jsonl"), "--block_size",
            str(args.block_size), "--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(steps),
            "--logging_steps", "1", "--eval_steps", str(steps), "--max_eval_batches", "4", "--warmup_steps", "0",
            "--lr_scheduler_type", "constant", "--report_to", "none", "--disable_tqdm", "--output_dir", str(out),
            *extra]
    assert run_main(argv) == 0, f"{name}: the run failed"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in records[1:] if r.get("step_time")] or [records[0]["step_time"]]
    step = out / "checkpoints" / f"step-{steps}"
    files = [p for p in step.iterdir() if p.name.startswith(("model", "optimizer")) and p.suffix == ".safetensors"]
    return {"step_time": statistics.median(times), "val_loss": records[-1]["val_loss"],
            "checkpoint_bytes": sum(p.stat().st_size for p in files), "out": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--steps", type=int, default=60, help="steps of each optimizer run")
    parser.add_argument("--timing_steps", type=int, default=12, help="steps of each packing and LoRA-vs-full run")
    parser.add_argument("--block_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lora_r", type=int, default=8)
    parser.add_argument("--adamw_lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--muon_lrs", type=float, nargs="+", default=[0.005, 0.02, 0.05])
    parser.add_argument("--workdir", default=None, help="keep the base, the data and the runs here (default: a "
                                                        "temporary folder)")
    args = parser.parse_args()

    import contextlib
    import io

    import torch

    from accel_trainer.data.chat import ChatRows

    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ft-"))
    root.mkdir(parents=True, exist_ok=True)
    make_base(root)
    write_conversations(root / "chat.jsonl", args.conversations)
    quiet = contextlib.redirect_stdout(io.StringIO())

    started = time.perf_counter()
    with quiet:
        unpacked = train(root, "unpacked", args, [], args.timing_steps)
    prepared = next((root / "unpacked" / "data").glob("chat-*"))
    render_s = time.perf_counter() - started
    with contextlib.redirect_stdout(io.StringIO()):
        packed = train(root, "packed", args, ["--packing"], args.timing_steps)
    rows = {p: ChatRows(prepared, args.block_size, 0.05, packing=p) for p in (False, True)}
    real = {p: float(r.lengths.sum()) / (r.num_blocks * args.block_size) for p, r in rows.items()}
    epoch = {p: rows[p].num_train / args.batch_size * (packed if p else unpacked)["step_time"] for p in rows}
    print(f"chat data: {args.conversations} conversations, {rows[False].manifest['total_tokens']:,} tokens "
          f"({rows[False].manifest['assistant_tokens']:,} the assistant's); first run incl. rendering {render_s:.1f} s")
    print(f"packing (full fine-tune, --block_size {args.block_size}, batch {args.batch_size}):")
    for p, label in ((False, "one per row"), (True, "packed     ")):
        r = (packed if p else unpacked)
        print(f"  {label}  rows {rows[p].num_blocks:>5}  real tokens {real[p]:6.1%}  "
              f"step {1e3 * r['step_time']:7.1f} ms  epoch {epoch[p]:7.2f} s")
    print(f"  ratio epoch time packed / one per row: {epoch[True] / epoch[False]:.3f}")

    with contextlib.redirect_stdout(io.StringIO()):
        lora = train(root, "lora", args, ["--packing", "--lora_r", str(args.lora_r), "--learning_rate", "3e-3"],
                     args.timing_steps)
    print(f"LoRA r={args.lora_r} vs full fine-tune (packed):")
    full_bytes, lora_bytes = packed["checkpoint_bytes"], lora["checkpoint_bytes"]
    print(f"  checkpoint weights + optimizer state: full {full_bytes / 2**20:.2f} MiB, LoRA "
          f"{lora_bytes / 2**20:.3f} MiB, ratio {lora_bytes / full_bytes:.4f}")
    print(f"  step time: full {1e3 * packed['step_time']:.1f} ms, LoRA {1e3 * lora['step_time']:.1f} ms, ratio "
          f"{lora['step_time'] / packed['step_time']:.3f}")

    print(f"adapters' optimizer (LoRA r={args.lora_r}, packed, {args.steps} steps; val loss on the assistant's "
          "tokens):")
    best = {}
    for name, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
        for lr in lrs:
            flags = ["--packing", "--lora_r", str(args.lora_r)]
            flags += (["--learning_rate", str(lr)] if name == "adamw"
                      else ["--muon_params", r"\.lora_", "--muon_learning_rate", str(lr)])
            with contextlib.redirect_stdout(io.StringIO()):
                result = train(root, f"{name}-{lr}", args, flags, args.steps)
            print(f"  {name:<6} lr {lr:<7g} val_loss {result['val_loss']:.4f}")
            if name not in best or result["val_loss"] < best[name][0]:
                best[name] = (result["val_loss"], lr)
    (adamw, adamw_lr), (muon, muon_lr) = best["adamw"], best["muon"]
    print(f"  best: adamw {adamw:.4f} (lr {adamw_lr:g}), muon {muon:.4f} (lr {muon_lr:g}); ratio muon / adamw "
          f"val loss {muon / adamw:.3f}")


if __name__ == "__main__":
    main()
