"""Workers never outlive their launcher: torch elastic starts each rank in a session of its own, so a
SIGKILL to the launcher's process group reaches only the launcher. Each worker asks Linux for a
signal when its parent dies, saves its emergency checkpoint and ends, and nothing says "running"."""

import json
import os
import signal
import time

from launching import RUN, assert_same_final_state, popen_launch, read_jsonl, run_pids, wait_for


def running(pid: int) -> bool:
    """Alive and not a zombie (an ended process whose new parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_sigkill_to_the_launchers_process_group_ends_every_worker(tmp_path):
    proc = popen_launch([*RUN, "--max_steps", "100000", "--output_dir", str(tmp_path)])
    wait_for(tmp_path / "checkpoints" / "step-3" / "COMPLETE", proc)
    workers = [pid for pid, rank in run_pids(tmp_path).items() if rank >= 0]
    assert len(workers) == 2, workers
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and what shares its group; the ranks have their own
    proc.wait(timeout=30)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(running(pid) for pid in workers):
        time.sleep(0.5)
    alive = [pid for pid in workers if running(pid)]
    for pid in alive:  # leave nothing behind even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their launcher"
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status["exit_code"] == 128 + signal.SIGTERM and status["meaning"] != "running", status


def test_a_killed_rank_comes_back_under_max_restarts_with_the_losses_of_an_uninterrupted_run(tmp_path,
                                                                                                straight_2proc):
    """`accelerate launch --max_restarts N ... --resume_from_checkpoint latest`: kill -9 of one rank;
    the launcher starts a new round, which resumes from latest and finishes as if nothing happened."""
    proc = popen_launch([*RUN, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"],
                        launcher=["--max_restarts", "1", "--monitor_interval", "0.5"])
    wait_for(tmp_path / "checkpoints" / "step-6" / "COMPLETE", proc)
    ranks = {rank: pid for pid, rank in run_pids(tmp_path).items() if rank >= 0}
    os.kill(ranks[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-20000:]
    assert "resumed from" in output, output[-3000:]
    # The new round's ranks met in a store namespace of their own, not at the dead round's addresses.
    assert "restart 1 (accelerate launch --max_restarts): the ranks joined this round's process group" in output
    assert json.loads((tmp_path / "exit_status.json").read_text())["exit_code"] == 0
    assert_same_final_state(straight_2proc, tmp_path, ranks=2)
    last = read_jsonl(straight_2proc / "metrics.jsonl")[-1]["step"]
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["step"] == last
