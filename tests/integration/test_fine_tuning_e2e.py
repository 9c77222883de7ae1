"""LoRA on chat data in fresh processes (issue #30): kill -9 then resume is bitwise the run that was
not killed, adapters and optimizer state alike; on two ranks (DDP, gloo) the step's loss is the mean
over every assistant token of the step, as on one process with the same rows."""

from __future__ import annotations

import pytest

from chat_models import make_chat_model
from launching import REPO, assert_same_final_state, kill_9_then_resume, launch, launch_here, read_jsonl

CAUSAL_LM = REPO / "recipes" / "causal_lm.py"


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return make_chat_model(tmp_path_factory.mktemp("chat"))


def lora_args(chat, batch: int = 4) -> list[str]:
    return ["--model_name_or_path", str(chat / "llama"), "--chat_data", str(chat / "chat.jsonl"), "--packing",
            "--block_size", "256", "--lora_r", "4", "--lora_dropout", "0.1", "--learning_rate", "0.01",
            "--per_device_train_batch_size", str(batch), "--max_steps", "8", "--save_steps", "2", "--eval_steps", "4",
            "--logging_steps", "1", "--report_to", "none", "--disable_tqdm"]


def test_lora_on_chat_data_survives_kill_9_bitwise(chat, tmp_path):
    args = lora_args(chat)
    straight = tmp_path / "straight"
    launch_here([*args, "--output_dir", str(straight)], script=CAUSAL_LM)
    killed = tmp_path / "killed"
    kill_9_then_resume(args, killed, at_step=4, script=CAUSAL_LM)
    # Adapters, their AdamW moments, the RNG (LoRA dropout draws from it), the data position: bitwise.
    assert_same_final_state(straight, killed, step=8)


def test_two_ranks_take_the_mean_over_every_assistant_token_of_the_step(chat, tmp_path):
    one = tmp_path / "one"
    launch_here([*lora_args(chat, batch=4), "--max_steps", "1", "--output_dir", str(one)], script=CAUSAL_LM)
    two = tmp_path / "two"
    launch([*lora_args(chat, batch=2), "--max_steps", "1", "--output_dir", str(two)], num_processes=2,
           script=CAUSAL_LM)
    # The same 4 packed rows in step 1, split 2 + 2 over the ranks with their own counts of targets.
    assert read_jsonl(two / "metrics.jsonl")[0]["loss"] == pytest.approx(
        read_jsonl(one / "metrics.jsonl")[0]["loss"], rel=1e-6)
