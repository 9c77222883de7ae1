"""Standard benchmarks on checkpoints: accel-trainer eval gives the harness's own numbers, and tasks
run inside a training run at the right steps, continued by a resumed run. Offline: a tiny local task
(tests/data/tasks/stdlib_next_line, built from the embedded corpus)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launching import REPO, TINY, launch_here, read_jsonl

TASKS = str(REPO / "tests" / "data" / "tasks")
TASK = "stdlib_next_line"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluated") / "run"
    launch_here([*TINY, "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3", "--output_dir", str(out)])
    return out


def test_accel_trainer_eval_gives_the_numbers_of_the_harness_own_cli(trained, tmp_path, capsys, monkeypatch):
    from accel_trainer.cli import main

    monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository root

    assert main(["eval", str(trained), "--tasks", TASK, "--include_path", TASKS, "--limit", "24"]) == 0
    assert "|stdlib_next_line|" in capsys.readouterr().out  # the harness's table
    saved = json.loads((trained / "eval" / "step-6" / f"{TASK}.json").read_text())
    assert saved["step"] == 6 and saved["tasks"] == [TASK]
    assert main(["export", str(trained), str(tmp_path / "export")]) == 0
    theirs = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                             f"pretrained={tmp_path / 'export'}", "--tasks", TASK, "--include_path", TASKS,
                             "--limit", "24", "--device", "cpu", "--output_path", str(tmp_path / "harness")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert theirs.returncode == 0, theirs.stderr[-3000:]
    (result,) = (tmp_path / "harness").rglob("results_*.json")
    expected = json.loads(result.read_text())["results"][TASK]["acc,none"]
    # The export is stock Qwen2-MoE: the same function to float rounding, so the same choices.
    assert saved["results"][TASK]["acc,none"] == expected


def test_in_loop_tasks_run_at_their_steps_and_a_resumed_run_continues_them(tmp_path):
    out = tmp_path / "run"
    run = [*TINY, "--eval_steps", "0", "--save_steps", "2", "--eval_tasks", TASK, "--eval_tasks_steps", "2",
           "--eval_tasks_limit", "8", "--eval_include_path", TASKS, "--lr_schedule_steps", "6", "--output_dir",
           str(out)]
    launch_here([*run, "--max_steps", "4"])  # 4 steps, then 2 more after a resume
    launch_here([*run, "--max_steps", "6", "--resume_from_checkpoint", "latest"])
    records = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records if f"eval/{TASK}/acc" in r]
    assert steps == [2, 4, 6]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step-2", "step-4", "step-6"]


def test_eval_takes_a_lora_checkpoint_and_its_adapter_export_alike(tmp_path, capsys, monkeypatch):
    """The harness on a LoRA run's checkpoint (base from its recorded path) and on PEFT's adapter
    folder exported from it: the same numbers."""
    from accel_trainer.cli import main
    from chat_models import make_chat_model

    chat = make_chat_model(tmp_path / "chat", n_conversations=32)
    run = tmp_path / "lora"
    launch_here(["--model_name_or_path", str(chat / "llama"), "--chat_data", str(chat / "chat.jsonl"), "--lora_r",
                 "4", "--learning_rate", "0.05", "--block_size", "256", "--per_device_train_batch_size", "4",
                 "--max_steps", "3", "--eval_steps", "0", "--report_to", "none", "--disable_tqdm", "--output_dir",
                 str(run)], script=REPO / "recipes" / "causal_lm.py")
    monkeypatch.chdir(REPO)
    capsys.readouterr()
    assert main(["eval", str(run), "--tasks", TASK, "--include_path", TASKS, "--limit", "16"]) == 0
    on_checkpoint = [line for line in capsys.readouterr().out.splitlines() if f"|{TASK}|" in line]
    assert main(["export", str(run), str(tmp_path / "adapter")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "adapter"), "--tasks", TASK, "--include_path", TASKS, "--limit", "16"]) == 0
    on_export = [line for line in capsys.readouterr().out.splitlines() if f"|{TASK}|" in line]
    assert on_checkpoint and on_checkpoint == on_export
    assert (run / "eval" / "step-3" / f"{TASK}.json").is_file()
