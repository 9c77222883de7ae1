"""Write a golden checkpoint with the accel_trainer of an older commit (how tests/data/golden/format-*
were made; see README.md there).

    git worktree add /tmp/old <commit>
    cd tests/data/golden && PYTHONPATH=/tmp/old python make_golden.py format-N

Trains the ``micro`` preset below for 6 steps on ``corpus.txt`` (a checkpoint at step 6), then records
what that code's own ``load_model_for_inference`` computes for a fixed input, so the current code can
be held to the same logits.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from accel_trainer.checkpoint import load_model_for_inference
from accel_trainer.config import DataArguments, ModelArguments, TrainingArguments, parse_args
from accel_trainer.run import run

PRESETS = {"micro": dict(vocab_size=259, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                         shared_expert_intermediate_size=16, max_position_embeddings=64)}
FLAGS = ["--preset", "micro", "--data_files", "corpus.txt", "--block_size", "32", "--per_device_train_batch_size", "4",
         "--max_steps", "6", "--save_steps", "6", "--eval_steps", "3", "--report_to", "none", "--disable_tqdm"]
PROMPT = list(b"golden checkpoints")


def main(name: str) -> None:
    torch.set_num_threads(1)
    out = Path(name)
    shutil.rmtree(out, ignore_errors=True)
    m, d, t = parse_args((ModelArguments, DataArguments, TrainingArguments), FLAGS + ["--output_dir", name])
    run(PRESETS, m, d, t)
    model = load_model_for_inference(out / "checkpoints" / "step-6")
    model = model[0] if isinstance(model, tuple) else model
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT])).logits
    save_file({"logits": logits[0].contiguous()}, str(out / "expected_logits.safetensors"))
    for tracker in ("runs", "tensorboard"):
        shutil.rmtree(out / tracker, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
