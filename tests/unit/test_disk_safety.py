"""The trainer's side of a save that does not fit or fails half-way (the protocol itself is tested
file by file in test_checkpointer.py): existing checkpoints are never damaged; by default the run
warns and trains on, with --save_strict it stops with one clear line and exit status 2. The recipe's
main() runs in-process so the fault can be injected."""

import collections
import json
import shutil

import pytest

from accel_trainer.checkpoint.layout import read_pointer
from launching import TINY
from accel_trainer.faults import failing_disk

ARGS = [*TINY, "--max_steps", "6", "--save_steps", "2", "--eval_steps", "0"]


@pytest.fixture
def run(recipe_module, capsys, tmp_path):
    def go(*extra):
        code = recipe_module.main([*ARGS, "--output_dir", str(tmp_path), *extra])
        return code, capsys.readouterr()

    return go


def no_room_at_step_4(monkeypatch):
    real, calls = shutil.disk_usage, []

    def disk_usage(path):
        if str(path).endswith("checkpoints"):
            calls.append(path)
            if len(calls) == 2:  # the second save (step 4) finds 1000 bytes free
                return collections.namedtuple("Usage", "total used free")(10**9, 10**9 - 1000, 1000)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def assert_step_4_skipped(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-2", "step-6"] and not list(root.glob(".tmp-*"))
    assert read_pointer(root, "latest").name == "step-6"
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1] == 6


def test_a_save_that_would_not_fit_is_skipped_and_training_goes_on(run, tmp_path, monkeypatch):
    no_room_at_step_4(monkeypatch)
    code, out = run()
    assert code == 0
    assert "WARNING: checkpoint at step 4 not saved: it needs about" in out.out
    assert "the previous checkpoints are intact" in out.out
    assert_step_4_skipped(tmp_path)


@pytest.mark.parametrize("extra,expect", [
    ([], "checkpoint at step 4 not saved: No space left on device"),
    (["--async_save"], "background checkpoint write failed (OSError: [Errno 28] No space left on device"),
])
def test_a_full_disk_while_writing_is_skipped_and_training_goes_on(run, tmp_path, extra, expect):
    with failing_disk("model.safetensors", inside=".tmp-step-4", after_bytes=100):
        code, out = run(*extra)
    assert code == 0
    assert expect in out.out and "the previous checkpoints are intact" in out.out
    assert_step_4_skipped(tmp_path)


def test_save_strict_stops_with_one_line_and_keeps_checkpoints(run, tmp_path):
    with failing_disk(inside=".tmp-step-4"):
        code, out = run("--save_strict")
    assert code == 2
    errors = [line for line in out.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint at step 4 not saved: " in errors[0]
    assert errors[0].endswith("(--save_strict)")
    assert "Traceback" not in out.err
    root = tmp_path / "checkpoints"
    assert (root / "step-2" / "COMPLETE").exists() and not (root / "step-4").exists()
    assert not list(root.glob(".tmp-*"))
