"""A plain Accelerate training loop, made crash-proof by accel_trainer's Checkpointer.

It trains a small, randomly initialised Llama (no download) on the bytes of this file with
``torch.optim.AdamW`` and ``transformers.get_cosine_schedule_with_warmup``. The lines marked
``# <- checkpointing`` are all it takes: kill it at any moment (``kill -9``, SIGTERM from a
scheduler, Ctrl-C) and the same command with ``--resume_from_checkpoint latest`` continues with the
same next batch, learning rate, optimizer moments and RNG, so its losses are bitwise those of an
uninterrupted run, on 1 or several processes.

    python examples/accelerate_loop.py --output_dir runs/loop --max_steps 60
    python examples/accelerate_loop.py --output_dir runs/loop --max_steps 60 --resume_from_checkpoint latest
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

from accel_trainer.checkpoint import Checkpointer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="runs/loop")
    p.add_argument("--max_steps", type=int, default=60)
    p.add_argument("--save_steps", type=int, default=10)
    p.add_argument("--eval_steps", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume_from_checkpoint", default=None, help="latest, best, step-<N> or a path")
    p.add_argument("--async_save", action="store_true")
    return p.parse_args(argv)


class LoopState:
    """The loop's own counters; anything with state_dict()/load_state_dict() can be checkpointed."""

    def __init__(self):
        self.tokens_seen = 0

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = state["tokens_seen"]


def byte_blocks(block_size: int) -> torch.Tensor:
    data = torch.tensor(list(Path(__file__).read_bytes()), dtype=torch.long)
    n = len(data) // block_size
    return data[: n * block_size].view(n, block_size)


def forever(loader):
    while True:
        yield from loader  # one pass = one epoch


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    set_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=args.block_size,
                                         attention_dropout=0.1))  # random ops in the loop: resume stays exact
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.max_steps // 10, args.max_steps)
    blocks = byte_blocks(args.block_size)
    n_val = max(1, len(blocks) // 10)
    train_loader = DataLoader(blocks[n_val:], batch_size=args.batch_size, shuffle=True, drop_last=True)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    val = blocks[:n_val].to(accelerator.device)
    loop = LoopState()

    ckpt = Checkpointer(accelerator, args.output_dir, model=model, optimizer=optimizer,    # <- checkpointing
                        scheduler=scheduler, dataloader=train_loader, extra={"loop": loop},
                        config=vars(args), save_total_limit=3, async_save=args.async_save,
                        handle_signals=True)
    train_loader = ckpt.dataloader               # same batches; continues mid-epoch after a resume  <- checkpointing
    start = ckpt.resume(args.resume_from_checkpoint) if args.resume_from_checkpoint else 0  # <- checkpointing

    batches = forever(train_loader)
    model.train()
    for step in range(start + 1, args.max_steps + 1):
        batch = next(batches)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        loop.tokens_seen += batch.numel() * accelerator.num_processes
        accelerator.print(json.dumps({"step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}))
        if step % args.save_steps == 0 or step == args.max_steps:
            metrics = {}
            if step % args.eval_steps == 0 or step == args.max_steps:
                with torch.no_grad():
                    model.eval()
                    metrics["val_loss"] = model(input_ids=val, labels=val).loss.item()
                    model.train()
            ckpt.save(step, metrics=metrics)     # collective; a lower val_loss makes it 'best'  <- checkpointing
        if ckpt.stop_requested():                # SIGTERM/SIGUSR1/Ctrl-C on any process  <- checkpointing
            if ckpt.last_saved_step != step:
                ckpt.save(step, reason="emergency", wait=True)
            accelerator.print(f"stopped by {ckpt.stop_signal.name} at step {step}; resume with "
                              "--resume_from_checkpoint latest")
            break
    ckpt.close()                                 # waits for an async save in flight  <- checkpointing
    accelerator.end_training()


if __name__ == "__main__":
    main()
