"""Real launches of the recipe: one process, and two processes over gloo (the CI stand-in for multi-GPU)."""

import pytest

from conftest import TINY, launch, read_jsonl

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


def test_tensorboard_tracker_writes_events(single_run):
    out, _ = single_run
    assert list(out.rglob("events.out.tfevents.*")), "no TensorBoard event file under the output dir"


def test_run_summary_reports_one_process(single_run):
    _, proc = single_run
    assert "1 process(es)" in proc.stdout


def test_two_process_launch_counts_tokens_of_both(single_run, tmp_path):
    single_out, _ = single_run
    proc = launch([*TINY, "--max_steps", "6", "--logging_steps", "1", "--eval_steps", "0",
                   "--output_dir", str(tmp_path)], num_processes=2)
    assert "2 process(es) [DistributedType.MULTI_CPU]" in proc.stdout
    two = read_jsonl(tmp_path / "metrics.jsonl")
    one = read_jsonl(single_out / "metrics.jsonl")
    assert [r["tokens_seen"] for r in two] == [2 * r["tokens_seen"] for r in one[:6]]
