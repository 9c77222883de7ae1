"""Real launches of the recipe: one process, and two processes over gloo (the CI stand-in for multi-GPU)."""

import re

import pytest

from conftest import REPO, TINY, launch, read_jsonl

pytestmark = pytest.mark.slow


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


def test_run_summary_reports_one_process(single_run):
    _, proc = single_run
    assert "1 process(es)" in proc.stdout


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    proc = launch([*TINY, "--max_steps", "6", "--logging_steps", "1", "--eval_steps", "0", "--output_dir", str(out)],
                  num_processes=2, script=REPO / "tests" / "exit_threads_worker.py")
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
