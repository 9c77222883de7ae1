"""Shared helpers: real launches of the recipe through `accelerate launch`, on CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "moe18b.py"
# Small enough that data prep and a step take well under a second on 2 cores.
TINY = ["--preset", "tiny", "--max_corpus_bytes", "300000", "--report_to", "none", "--disable_tqdm",
        "--per_device_train_batch_size", "4", "--block_size", "64"]

# The resume tests' run: gradient accumulation, eval and periodic saves all in play.
STEPS = 24
RUN = [*TINY, "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--eval_steps", "4",
       "--save_steps", "3", "--max_steps", str(STEPS)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], num_processes: int = 1, timeout: float = 300, check: bool = True,
           env: dict | None = None, config_file: str | None = None,
           script: Path = RECIPE) -> subprocess.CompletedProcess:
    """Run the recipe (or another ``script``) in fresh processes.

    Two or more processes go through `accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=1 (gloo),
    as documented; with ``config_file`` through `accelerate launch --config_file`; one process runs
    the recipe directly, which is what `accelerate launch` does for one process, and keeps the
    recipe's own exit status (the launcher turns every failure into 1).
    """
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if config_file:
        cmd = accelerate + ["--config_file", str(REPO / config_file)]
    elif num_processes == 1:
        cmd = [sys.executable]
    else:
        cmd = accelerate + ["--multi_gpu", "--num_processes", str(num_processes),
                            "--main_process_port", str(free_port()), "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no"]
        full_env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd + [str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def recipe_module():
    sys.path.insert(0, str(REPO))
    import recipes.moe18b as recipe

    return recipe


@pytest.fixture(scope="session")
def straight_2proc(tmp_path_factory):
    """A 2-process reference run of RUN, shared by the resume and world-size tests."""
    out = tmp_path_factory.mktemp("straight2")
    launch([*RUN, "--output_dir", str(out)], num_processes=2, env={"ACCEL_TRAINER_BLOCK_LOG": str(out / "blocks")})
    return out


def blocks_per_step(prefix: Path) -> dict[int, list[int]]:
    """The blocks every step read, over all ranks (from the trainer's ACCEL_TRAINER_BLOCK_LOG audit)."""
    steps: dict[int, list[int]] = {}
    for log in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        for record in read_jsonl(log):
            steps.setdefault(record["step"], []).extend(record["blocks"])
    return {step: sorted(blocks) for step, blocks in steps.items()}


def run_pids(output_dir: Path) -> dict[int, int]:
    """Process id by pid of every process whose command line names ``output_dir`` (the launcher and
    each rank); ``LOCAL_RANK`` of each rank as value, -1 for others. torch's launcher starts ranks
    in sessions of their own, so killing the launcher's process group does not reach them."""
    pids = {}
    for proc_dir in Path("/proc").iterdir():
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
            environ = dict(e.split(b"=", 1) for e in (proc_dir / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError):
            continue
        if str(output_dir).encode() in cmdline:
            pids[int(proc_dir.name)] = int(environ.get(b"LOCAL_RANK", b"-1"))
    return pids


def kill_run(output_dir: Path) -> None:
    """``kill -9`` every process of a run at once: launcher and ranks."""
    for pid in run_pids(output_dir):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
