"""The one launch helper of the test suite: fresh processes through `accelerate launch`, torchrun or
Python itself, on CPU, and what they leave behind (metrics, the data-order audit, process ids)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate.utils import load as load_rng  # weights-only, with the numpy globals RNG states need

from accel_trainer.checkpoint import read_tensor_file, tensor_file

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
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


def launch_here(args: list[str], check: bool = True, script: Path = RECIPE) -> subprocess.CompletedProcess:
    """The recipe (or another ``script``) in this process, as ``python script args`` runs it (what
    `accelerate launch` runs for one process), its stdout and stderr captured: for tests that only
    read what a run prints and leaves, without the seconds a fresh interpreter spends importing torch
    and transformers. Kills, signals and several ranks need :func:`launch`."""
    import contextlib
    import io
    import runpy

    def recipe_main(argv):
        saved = sys.argv
        sys.argv = [str(script), *argv]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
        return 0

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # printed to stderr by a process of its own: kept as it would be
        try:
            code = recipe_main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    printed = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue() + printed)
    if check and code != 0:
        raise AssertionError(f"run failed ({code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def popen_launch(args: list[str], num_processes: int = 2, script: Path = RECIPE,
                 launcher: list[str] = ()) -> subprocess.Popen:
    """`accelerate launch --multi_gpu` on CPU ranks in a session of its own (``os.killpg`` reaches
    the launcher and every rank); its output is read from ``proc.stdout``. ``launcher``: more flags
    of `accelerate launch` (``--max_restarts 1``)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--main_process_port", str(free_port()), "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *launcher, str(script), *args]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def blocks_per_step(output_dir: Path) -> dict[int, list[int]]:
    """The blocks every step read, over all ranks (from the trainer's --log_data_blocks audit)."""
    steps: dict[int, list[int]] = {}
    for log in sorted(Path(output_dir).glob("data_blocks.rank*.jsonl")):
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


def torchrun(n: int, script: Path, *args, timeout: float = 300, expect_killed: bool = False,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node n script args`` on CPU ranks (1 thread each).

    With ``expect_killed`` the run must end by SIGKILL (a rank killed itself on purpose)."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                           "--master_port", str(free_port()), str(script), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if expect_killed:
        assert proc.returncode != 0 and "SIGKILL" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def step_losses(stdout: str) -> dict[int, float]:
    """``step N loss X`` lines a worker printed."""
    return {int(s): float(v) for s, v in re.findall(r"^step (\d+) loss (\S+)$", stdout, re.M)}


def popen_recipe(args, out: Path, script: Path = RECIPE) -> subprocess.Popen:
    """The recipe (or another ``script``) as a plain process (no launcher in between), in its own
    process group, so that ``os.killpg(proc.pid, SIGKILL)`` kills it all as a node failure would."""
    return subprocess.Popen([sys.executable, str(script), *args, "--output_dir", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def kill_9_then_resume(args: list[str], out: Path, at_step: int, script: Path = RECIPE) -> Path:
    """The recipe as a plain process, ``kill -9`` once ``step-<at_step>`` is complete, then the same
    command with ``--resume_from_checkpoint latest`` in this process; returns the checkpoint it resumed
    from (the newest complete one: the 'latest' pointer may lag it by the instant of the kill)."""
    import signal

    from accel_trainer.checkpoint import resolve

    run = popen_recipe(args, out, script=script)
    wait_for(out / "checkpoints" / f"step-{at_step}" / "COMPLETE", run)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    latest = resolve("latest", out).path
    assert latest is not None and (latest / "COMPLETE").is_file() and int(latest.name[5:]) >= at_step
    resumed = launch_here([*args, "--output_dir", str(out), "--resume_from_checkpoint", "latest"], script=script)
    assert f"resumed from {latest}" in resumed.stdout
    return latest


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def assert_same_final_state(a: Path, b: Path, step: int = STEPS, ranks: int = 1) -> None:
    """Bitwise: per-step losses/LRs, weights, every optimizer state tensor, every rank's RNG."""
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb):
        for key in ("loss", "lr/muon", "lr/adamw", "ema_loss", "tokens_seen", "val_loss"):
            assert x.get(key) == y.get(key), (x["step"], key, x.get(key), y.get(key))
    ca, cb = a / "checkpoints" / f"step-{step}", b / "checkpoints" / f"step-{step}"
    for name in ("model.safetensors", "optimizer.safetensors"):  # stored plain or compressed (ztensors)
        fa, fb = tensor_file(ca, name), tensor_file(cb, name)
        ta, tb = read_tensor_file(fa), read_tensor_file(fb)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        if fa.name == fb.name:  # files are a function of the state alone: the same state, the same bytes
            assert fa.read_bytes() == fb.read_bytes(), name
    assert (ca / "optimizer.json").read_bytes() == (cb / "optimizer.json").read_bytes()
    names = {n for o in json.loads((ca / "optimizer.json").read_text())["optimizers"].values()
             for g in o["param_groups"] for n in g["param_names"]}
    saved = read_tensor_file(tensor_file(ca, "optimizer.safetensors"))
    assert {k.split("::")[0] for k in saved} == names  # every parameter has state
    for rank in range(ranks):
        sa, sb = (load_rng(c / f"random_states_{rank}.pkl") for c in (ca, cb))
        assert torch.equal(sa["torch_manual_seed"],
                           sb["torch_manual_seed"]) and sa["random_state"] == sb["random_state"]
    for name in ("trainer_state.json", "dataloader.json"):
        # The tracker run is named after each run's own output dir.
        sa, sb = (json.loads((c / name).read_text()) for c in (ca, cb))
        assert {k: v for k, v in sa.items() if k != "trackers"} == {k: v for k, v in sb.items() if k != "trackers"}
