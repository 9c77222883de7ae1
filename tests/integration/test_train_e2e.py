"""Real launches of the recipe: one process, and two processes over gloo (the CI stand-in for multi-GPU)."""

import re

import pytest

from launching import REPO, TINY, launch, read_jsonl



@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = launch([*TINY, "--max_steps", "60", "--logging_steps", "1", "--eval_steps", "20",
                   "--output_dir", str(out), "--report_to", "tensorboard"], config_file="accelerate_configs/cpu.yaml")
    return out, proc


def test_loss_falls_and_metrics_jsonl_has_the_fields(single_run):
    out, proc = single_run
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 61))
    for key in ("loss", "lr/muon", "lr/adamw", "tokens_seen", "ema_loss", "grad_norm"):
        assert key in records[0], key
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40, 60]
    assert records[-1]["loss"] <= 0.7 * records[0]["loss"], (records[0]["loss"], records[-1]["loss"])
    assert records[0]["tokens_seen"] == 4 * 64 and records[-1]["tokens_seen"] == 60 * 4 * 64


def test_metrics_report_throughput_memory_and_the_routers(single_run):
    out, _ = single_run
    last = read_jsonl(out / "metrics.jsonl")[-1]
    assert last["tokens_per_second"] > 0 and last["tokens_per_second_per_device"] == last["tokens_per_second"]
    assert last["step_time"] > 0 and last["memory/peak_rss_gib"] > 0.1
    assert last["mfu"] is None  # no peak FLOP/s is known for a CPU
    assert 1.0 <= last["router/imbalance/layer_0"] <= 4.0 and last["router/imbalance_max"] >= 1.0  # 4 experts
    assert last["router/aux_loss"] > 0 and last["nonfinite_steps"] == 0


def test_tensorboard_tracker_writes_events(single_run):
    out, _ = single_run
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file under the output dir"


def test_the_run_ends_with_a_report_of_itself_and_its_exit_status(single_run):
    import json

    out, proc = single_run
    tail = proc.stdout.strip().splitlines()[-5:]
    assert tail[0].startswith("finished step 60 in ") and f"{60 * 4 * 64:,} tokens in this run (" in tail[0], tail
    assert "tokens/s)" in tail[0]
    assert re.fullmatch(r"train loss \(EMA\) \d\.\d{4}; last val loss \d\.\d{4} \(step 60\); "
                        r"best val loss \d\.\d{4} \(step \d+\)", tail[1]), tail[1]
    assert tail[2] == f"metrics      {out}/metrics.jsonl"
    assert tail[3] == f"TensorBoard  {out}/{out.name}  (tensorboard --logdir {out})"  # run name: the dir's name
    assert list((out / out.name).glob("events.out.tfevents.*"))
    assert tail[4].startswith(f"checkpoints  {out}/checkpoints (latest step-60, best step-")
    status = json.loads((out / "exit_status.json").read_text())
    assert status["exit_code"] == 0 and status["step"] == 60 and status["meaning"] == "finished"


def test_run_summary_reports_one_process(single_run):
    _, proc = single_run
    assert "1 process(es)" in proc.stdout


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    proc = launch([*TINY, "--max_steps", "6", "--logging_steps", "1", "--eval_steps", "0", "--output_dir", str(out)],
                  num_processes=2, script=REPO / "tests" / "integration" / "exit_threads_worker.py")
    return out, proc


def test_two_process_launch_counts_tokens_of_both(single_run, two_process_run):
    single_out, _ = single_run
    out, proc = two_process_run
    assert "2 process(es) [DistributedType.MULTI_CPU]" in proc.stdout
    two = read_jsonl(out / "metrics.jsonl")
    one = read_jsonl(single_out / "metrics.jsonl")
    assert [r["tokens_seen"] for r in two] == [2 * r["tokens_seen"] for r in one[:6]]


def test_two_process_run_frees_its_process_group_before_python_exits(two_process_run):
    """Gloo threads left to interpreter shutdown abort about 1 finished launch in 15 (exit -6)."""
    _, proc = two_process_run
    lines = re.findall(r"rank (\d) exit (\d+) threads (\[[^\]]*\])", proc.stdout)
    assert sorted(rank for rank, _, _ in lines) == ["0", "1"], proc.stdout[-2000:]
    for rank, code, threads in lines:
        assert code == "0" and "gloo" not in threads, (rank, code, threads)


def test_the_readme_quick_start_prints_no_warning_and_ends_with_the_report(tmp_path):
    """The quick start command as the README writes it (in a log file: no TTY), with no OMP_NUM_THREADS
    set, as on a fresh machine: no warning to act on, one progress line per logging step (no bars
    redrawn into the log), and the run's report at the end. Its first 30 of 200 steps (a later
    --max_steps wins): what it prints does not change after them, and the suite has ten minutes."""
    import os
    import shlex
    import subprocess
    import sys

    line = next(line for line in (REPO / "README.md").read_text().splitlines()
                if line.startswith("python3 -m venv") and "--output_dir runs/demo" in line)
    args = shlex.split(line.split("&& .venv/bin/accelerate launch ", 1)[1].replace("runs/demo", str(tmp_path / "demo")))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert args[args.index("--max_steps") + 1] == "200"
    args += ["--max_steps", "30"]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env={**env, "PYTHONUNBUFFERED": "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "warn" not in output.lower() and "\r" not in output, output[:3000]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["10/30", "20/30", "30/30"]
    assert all(" loss " in line and " lr/muon " in line and " lr/adamw " in line for line in progress)
    tail = proc.stdout.strip().splitlines()[-5:]
    assert tail[0].startswith("finished step 30 in ") and tail[-1].startswith("checkpoints  "), tail


def test_under_the_launcher_bad_input_is_one_line_and_the_status_file_keeps_the_code(tmp_path):
    """`accelerate launch` turns every failure into exit status 1 (-q drops its own traceback): the
    run's one line is all stderr holds, and exit_status.json tells a restart script it was bad input."""
    import json
    import subprocess
    import sys

    (tmp_path / "empty.txt").write_text("")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
                           str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_cpu_threads_per_process", "1",
                           str(REPO / "recipes" / "moe18b.py"), "--data_files", str(tmp_path / "empty.txt"),
                           "--output_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: --data_files: {tmp_path / 'empty.txt'} is empty"
    status = json.loads((tmp_path / "run" / "exit_status.json").read_text())
    assert status["exit_code"] == 2 and status["reason"] == f"--data_files: {tmp_path / 'empty.txt'} is empty"
    assert status["meaning"].startswith("bad input")
