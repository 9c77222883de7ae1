"""End to end: examples/accelerate_loop.py, a plain Accelerate loop made crash-proof by the
Checkpointer, is killed with kill -9 and resumed from 'latest'; its per-step losses are bitwise those
of an uninterrupted run, on 1 process and on 2 (the latter with background saves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from accel_trainer.checkpoint.layout import resolve_latest_valid
from launching import REPO, free_port, kill_run, launch, launch_here

EXAMPLE = REPO / "examples" / "accelerate_loop.py"
ARGS = ["--max_steps", "60", "--save_steps", "5", "--eval_steps", "10"]


def losses(stdout: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in (json.loads(line) for line in stdout.splitlines() if line.startswith("{"))}


def start(out, num_processes: int, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(EXAMPLE)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if num_processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--main_process_port", str(free_port()), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLE)]
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.Popen(cmd + [*ARGS, *extra, "--output_dir", str(out)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("num_processes,extra", [(1, []), (2, ["--async_save"])])
def test_killed_and_resumed_loop_has_the_losses_of_an_uninterrupted_one(tmp_path, num_processes, extra):
    def run(args):  # one process: in this one (what it prints is all that is read); two: launched
        if num_processes == 1:
            return launch_here(args, script=EXAMPLE)
        return launch(args, num_processes=num_processes, script=EXAMPLE)

    reference = run([*ARGS, *extra, "--output_dir", str(tmp_path / "straight")])
    expected = losses(reference.stdout)
    assert sorted(expected) == list(range(1, 61))

    out = tmp_path / "killed"
    proc = start(out, num_processes, extra)
    marker = out / "checkpoints" / "step-20" / "COMPLETE"
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
    kill_run(out)  # every process of the run, mid-step or mid-save
    proc.wait()
    # What 'latest' resolves to: the newest valid checkpoint (a kill between the rename of step-N and
    # the move of the 'latest' pointer leaves the pointer one behind; resolution still finds step-N).
    latest = resolve_latest_valid(out / "checkpoints").path
    assert latest is not None and int(latest.name[5:]) >= 20

    resumed = run([*ARGS, *extra, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert f"resumed from {latest}" in resumed.stdout
    got = losses(resumed.stdout)
    first = int(latest.name[5:]) + 1
    assert sorted(got) == list(range(first, 61))
    assert {s: expected[s] for s in got} == got  # bitwise: floats compared exactly
