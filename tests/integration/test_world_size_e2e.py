"""One checkpoint, every world size: a 2-process checkpoint resumes on 1 process and the reverse.

Same global batch both ways (2 x 4 = 1 x 8 sequences per micro-batch), so if the data position is
exact the continuation reproduces the reference's losses up to float reduction order.
"""

import json
import shutil

import pytest

from accel_trainer import load_model_for_inference
from accel_trainer.checkpoint.layout import read_pointer
from launching import RUN, STEPS, blocks_per_step, launch, launch_here, read_jsonl

ONE_PROC = [*RUN, "--per_device_train_batch_size", "8"]  # later flags win in HfArgumentParser


def continue_from(src, step, dest):
    shutil.copytree(src / "checkpoints" / f"step-{step}", dest / "checkpoints" / f"step-{step}")
    (dest / "checkpoints" / "latest").write_text(f"step-{step}\n")
    shutil.copy(src / "metrics.jsonl", dest / "metrics.jsonl")


def assert_losses_close(reference, other, from_step, rel=1e-3):
    # Float reduction order differs between world sizes and drifts slowly (~2e-4 after 10 steps);
    # a batch taken from a wrong data position changes the loss by percents.
    ref = {r["step"]: r for r in read_jsonl(reference / "metrics.jsonl")}
    got = {r["step"]: r for r in read_jsonl(other / "metrics.jsonl")}
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(from_step, STEPS + 1):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=rel), step
        assert got[step]["tokens_seen"] == ref[step]["tokens_seen"], step  # global counters stay global


def test_two_process_checkpoint_resumes_on_one_process(straight_2proc, tmp_path):
    continue_from(straight_2proc, 12, tmp_path)
    proc = launch_here([*ONE_PROC, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest",
                        "--log_data_blocks"])
    assert "per_device_train_batch_size: 4 -> 8" in proc.stdout
    # Exactly the blocks the uninterrupted 2-process run read, step by step.
    reference, resumed = blocks_per_step(straight_2proc), blocks_per_step(tmp_path)
    assert sorted(resumed) == list(range(13, STEPS + 1))
    assert {step: reference[step] for step in resumed} == resumed
    assert_losses_close(straight_2proc, tmp_path, from_step=13)
    latest, ref = read_pointer(tmp_path / "checkpoints", "latest"), straight_2proc / "checkpoints" / f"step-{STEPS}"
    for name in ("trainer_state.json", "dataloader.json"):
        state, expected = json.loads((latest / name).read_text()), json.loads((ref / name).read_text())
        for key in ("global_step", "tokens_seen", "epoch", "samples_in_epoch"):
            assert state.get(key) == expected.get(key), (name, key)


def test_one_process_checkpoint_resumes_on_two_processes_with_rng_notice(tmp_path):
    reference, resumed = tmp_path / "one", tmp_path / "two"
    launch_here([*ONE_PROC, "--output_dir", str(reference)])
    continue_from(reference, 12, resumed)
    proc = launch([*RUN, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"], num_processes=2)
    assert "rank 1:" in proc.stderr and "has no saved RNG for this rank" in proc.stderr
    assert_losses_close(reference, resumed, from_step=13)
    for path in (reference, resumed):
        model, _, step = load_model_for_inference(path, device="cpu")
        assert step == STEPS and model.load_report.exact
