"""The fault campaign: the checkpoint system against a hostile environment, on the tiny preset.

    python benchmarks/faults.py                  # the full campaign (about 20 minutes on 2 cores)
    python benchmarks/faults.py --sample         # a short sample (the test suite runs it)
    python benchmarks/faults.py --seed 3 --kills 30 --budget_min 40

Cases: kill -9 at random instants (during steps, during sync and async saves, 1 and 2 processes);
every file of the newest checkpoint truncated, flipped or deleted; garbage in the 'latest' pointer;
edited manifests and markers; two runs started on one output dir; a disk that fills up while
checkpoints are written (a small tmpfs when one can be mounted, else a writer that fails at a chosen
byte, in-process). After each fault the run is resumed from 'latest' in a fresh process and its
per-step losses are compared bitwise with an uninterrupted run of the same world size.

One process at a time, 1 OpenMP thread, seeded; stops starting trials when --budget_min is spent.
Prints one table: trials, and the failures per case (all zero is the pass mark): a 'latest' that
resolves to a checkpoint that does not load ("corrupt latest"), a resume that fails, a loss that
differs from the uninterrupted run, and a raw traceback anywhere (the run, the resume, the CLI).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "moe18b.py"

STEPS = 12
RUN = ["--preset", "tiny", "--max_corpus_bytes", "60000", "--report_to", "none", "--disable_tqdm",
       "--per_device_train_batch_size", "4", "--block_size", "64", "--logging_steps", "1", "--eval_steps", "4",
       "--save_steps", "2", "--max_steps", str(STEPS)]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@dataclass
class Outcome:
    corrupt_latest: bool = False
    failed_resume: bool = False
    diverged: bool = False
    traceback: bool = False
    note: str = ""


@dataclass
class Case:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)


# ------------------------------------------------------------------------------------- runs
def command(out: Path, procs: int, extra: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, str(RECIPE), *RUN, *extra, "--output_dir", str(out)]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(RECIPE), *RUN, *extra, "--output_dir", str(out)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(procs: int) -> dict:
    return {**ENV, "ACCELERATE_USE_CPU": "1"} if procs > 1 else ENV


def run(out: Path, procs: int = 1, extra: list[str] = (), timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, procs, list(extra)), capture_output=True, text=True, env=env_for(procs),
                          cwd=REPO, timeout=timeout)


def start(out: Path, procs: int = 1, extra: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(command(out, procs, list(extra)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env_for(procs), cwd=REPO)


def kill_all(out: Path) -> None:
    """kill -9 every process of the run (torch's launcher puts ranks in sessions of their own)."""
    for proc_dir in Path("/proc").iterdir():
        try:
            if str(out).encode() in (proc_dir / "cmdline").read_bytes().split(b"\0"):
                os.kill(int(proc_dir.name), 9)
        except (OSError, ValueError):
            continue


def losses(out: Path) -> dict[int, float]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    return {r["step"]: r["loss"] for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def has_traceback(*texts: str) -> bool:
    return any("Traceback (most recent call last)" in (t or "") for t in texts)


def resume_and_compare(out: Path, reference: Path, procs: int, outcome: Outcome) -> None:
    """Resolve 'latest', resume from it in a fresh process, compare every step's loss with the reference."""
    from accel_trainer.checkpoint import CheckpointError, resolve, verify

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            found = resolve("latest", out).path
        except CheckpointError:  # checkpoints exist and none verifies: nothing valid to resume
            found = None
    if found is not None and verify(found):
        outcome.corrupt_latest = True
    proc = run(out, procs, ["--resume_from_checkpoint", "latest"])
    outcome.traceback |= has_traceback(proc.stdout, proc.stderr)
    if proc.returncode != 0:
        outcome.failed_resume = True
        outcome.note = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return
    got, expected = losses(out), losses(reference)
    if sorted(got) != sorted(expected) or any(got[s] != expected[s] for s in got):
        outcome.diverged = True


def cli_never_tracebacks(out: Path, outcome: Outcome) -> None:
    """list/verify/inspect on the damaged run: exit codes are fine, tracebacks are not."""
    from accel_trainer.cli import main

    for args in (["list", str(out)], ["verify", str(out)], ["inspect", str(out)]):
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
                main(args)
        except SystemExit:
            pass
        except Exception as err:  # a raw traceback for a user
            outcome.traceback = True
            outcome.note = f"accel-trainer {args[0]}: {type(err).__name__}: {err}"[:200]


# ------------------------------------------------------------------------------------ cases
def kill_trial(work: Path, reference: Path, procs: int, extra: list[str], rng: random.Random,
               during_save: bool, train_seconds: float) -> Outcome:
    out = work / f"kill-{rng.randrange(10**9)}"
    proc = start(out, procs, extra)
    first = out / "checkpoints" / "step-2" / "COMPLETE"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if during_save:  # wait for a save in progress (a temporary folder), then kill at once
        target = time.time() + rng.uniform(0, train_seconds)
        while time.time() < deadline and proc.poll() is None:
            root = out / "checkpoints"
            if time.time() > target and root.is_dir() and any(p.name.startswith(".tmp-step") for p in root.iterdir()):
                break
            time.sleep(0.001)
    else:
        time.sleep(rng.uniform(0, train_seconds))
    kill_all(out)
    stdout, stderr = proc.communicate()
    outcome = Outcome(traceback=has_traceback(stdout, stderr) and proc.returncode != -9)
    resume_and_compare(out, reference, procs, outcome)
    shutil.rmtree(out, ignore_errors=True)
    return outcome


def damaged_copy(reference: Path, work: Path, name: str) -> tuple[Path, Path]:
    out = work / name
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".lock"))
    newest = out / "checkpoints" / f"step-{STEPS}"
    return out, newest


def file_damage_trial(work: Path, reference: Path, file: str, mode: str, rng: random.Random) -> Outcome:
    out, newest = damaged_copy(reference, work, f"damage-{mode}-{file.replace('/', '_')}")
    path = newest / file
    if mode == "delete":
        path.unlink()
    elif mode == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip one byte
        data = bytearray(path.read_bytes())
        data[rng.randrange(len(data))] ^= 0xFF
        path.write_bytes(bytes(data))
    outcome = Outcome()
    cli_never_tracebacks(out, outcome)
    resume_and_compare(out, reference, 1, outcome)
    shutil.rmtree(out, ignore_errors=True)
    return outcome


POINTER_GARBAGE = {
    "not UTF-8": lambda p: p.write_bytes(b"step-\xff\xfe"), "empty": lambda p: p.write_bytes(b""),
    "a folder": lambda p: (p.unlink(), p.mkdir()), "path traversal": lambda p: p.write_text("../../../etc\n"),
    "missing step": lambda p: p.write_text("step-999\n"), "a link to /etc/passwd": lambda p: (p.unlink(), p.symlink_to("/etc/passwd")),
    "an incomplete step": lambda p: ((p.parent / "step-99").mkdir(), p.write_text("step-99\n")),
}
META_EDITS = {
    "manifest not UTF-8": lambda f: (f / "manifest.json").write_bytes(b"\xff" * 64),
    "manifest file list emptied": lambda f: (f / "manifest.json").write_text(
        json.dumps({**json.loads((f / "manifest.json").read_text()), "files": {}})),
    "manifest truncated": lambda f: (f / "manifest.json").write_bytes((f / "manifest.json").read_bytes()[:50]),
    "marker edited": lambda f: (f / "COMPLETE").write_text('{"files": 1}'),
    "marker not UTF-8": lambda f: (f / "COMPLETE").write_bytes(b"\x80\x81"),
}


def pointer_trial(work: Path, reference: Path, name: str) -> Outcome:
    out, _ = damaged_copy(reference, work, "pointer-" + name.replace(" ", "_").replace("/", "_"))
    POINTER_GARBAGE[name](out / "checkpoints" / "latest")
    outcome = Outcome()
    cli_never_tracebacks(out, outcome)
    resume_and_compare(out, reference, 1, outcome)
    shutil.rmtree(out, ignore_errors=True)
    return outcome


def meta_trial(work: Path, reference: Path, name: str) -> Outcome:
    out, newest = damaged_copy(reference, work, "meta-" + name.replace(" ", "_"))
    META_EDITS[name](newest)
    (newest / "model.safetensors").write_bytes(b"\0" * (newest / "model.safetensors").stat().st_size)
    outcome = Outcome()
    cli_never_tracebacks(out, outcome)
    resume_and_compare(out, reference, 1, outcome)
    shutil.rmtree(out, ignore_errors=True)
    return outcome


def two_runs_trial(work: Path, reference: Path) -> Outcome:
    out = work / "two-runs"
    first = start(out, 1, ["--max_steps", "400"])
    deadline = time.time() + 120
    while not (out / ".lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    second = run(out, 1, ["--max_steps", "400"], timeout=120)
    outcome = Outcome(traceback=has_traceback(second.stdout, second.stderr))
    if second.returncode != 2 or "is in use by another run" not in second.stderr:
        outcome.failed_resume, outcome.note = True, f"second run: exit {second.returncode}"
    kill_all(out)
    first.communicate()
    steps = [r for r in losses(out)]
    if steps != sorted(set(steps)):  # the second run must not have written a line
        outcome.diverged, outcome.note = True, "metrics.jsonl has steps twice"
    shutil.rmtree(out, ignore_errors=True)
    return outcome


def full_disk_trial(work: Path, reference: Path, rng: random.Random) -> tuple[str, Outcome]:
    """A disk that fills up at a random moment while the run saves every step; the run goes on."""
    mount = work / "tmpfs"
    mount.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    if not mounted:
        return "full disk (failing writer, in-process)", failing_writer_trial(work, reference, rng)
    try:
        out = mount / "run"
        proc = start(out, 1, ["--save_steps", "1", "--save_total_limit", "2"])
        time.sleep(rng.uniform(4, 8))
        filler = mount / "filler"
        with open(filler, "wb") as f:  # another job fills the disk while checkpoints are written
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
        time.sleep(rng.uniform(0.3, 1.5))
        filler.unlink()
        stdout, stderr = proc.communicate(timeout=300)
        outcome = Outcome(traceback=has_traceback(stdout, stderr))
        if proc.returncode != 0 or any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir()):
            outcome.failed_resume, outcome.note = True, f"run exit {proc.returncode}: {stderr[-200:]}"
        if losses(out) != losses(reference):
            outcome.diverged = True
        resume_and_compare(out, reference, 1, outcome)
        return "full disk (tmpfs filled mid-run)", outcome
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def failing_writer_trial(work: Path, reference: Path, rng: random.Random) -> Outcome:
    from accel_trainer.faults import failing_disk

    sys.path.insert(0, str(REPO))
    from recipes.moe18b import main

    out = work / "failing-writer"
    step = rng.choice([4, 6, 8])
    buffer = io.StringIO()
    with failing_disk("model.safetensors", inside=f".tmp-step-{step}", after_bytes=rng.randrange(1, 4096)), \
            contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = main([*RUN, "--output_dir", str(out)])
    outcome = Outcome(traceback=has_traceback(buffer.getvalue()))
    if code != 0 or (out / "checkpoints" / f"step-{step}").exists():
        outcome.failed_resume, outcome.note = True, f"exit {code}"
    resume_and_compare(out, reference, 1, outcome)
    return outcome


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=8, help="kill -9 trials per kind (6 kinds)")
    parser.add_argument("--budget_min", type=float, default=30, help="start no trial after this many minutes")
    parser.add_argument("--sample", action="store_true",
                        help="a short sample: one kill during an async save, one damaged file, one bad pointer")
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--only", default=None, help="run only the cases whose name contains this")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    began = time.time()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="faults-"))
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    reference = work / "reference"
    assert run(reference).returncode == 0, "the reference run failed"
    train_seconds = max(1.0, (time.time() - t0) - 4.0)  # minus start-up
    cases: dict[str, Case] = {}

    def record(name: str, outcome: Outcome) -> None:
        cases.setdefault(name, Case(name)).outcomes.append(outcome)
        flag = "" if not (outcome.corrupt_latest or outcome.failed_resume or outcome.diverged or outcome.traceback) \
            else f"  FAILED {outcome}"
        print(f"[{time.time() - began:6.0f}s] {name}{flag}", flush=True)

    def in_budget(name: str = "") -> bool:
        wanted = args.only is None or args.only in name
        return wanted and time.time() - began < args.budget_min * 60

    kills = 1 if args.sample else args.kills
    kinds = [("kill -9, 1 process, sync saves", 1, [], False),
             ("kill -9, 1 process, during a sync save", 1, [], True),
             ("kill -9, 1 process, async saves", 1, ["--async_save"], False),
             ("kill -9, 1 process, during an async save", 1, ["--async_save"], True)]
    if not args.sample and in_budget("2 processes"):
        reference2 = work / "reference2"
        assert run(reference2, 2).returncode == 0, "the 2-process reference run failed"
        kinds += [("kill -9, 2 processes", 2, [], False), ("kill -9, 2 processes, during a save", 2, [], True)]
    for _ in range(kills):
        for name, procs, extra, during_save in (kinds[3:4] if args.sample else kinds):
            if in_budget(name):
                ref = reference if procs == 1 else reference2
                record(name, kill_trial(work, ref, procs, extra, rng, during_save, train_seconds))

    newest = reference / "checkpoints" / f"step-{STEPS}"
    files = sorted(json.loads((newest / "manifest.json").read_text())["files"]) + ["manifest.json", "COMPLETE"]
    modes = ["truncate", "flip", "delete"]
    plan = [(f, m) for f in files for m in modes]
    if args.sample:
        plan = rng.sample(plan, 1)
    for file, mode in plan:
        name = f"{file} {mode}d" if mode != "flip" else f"{file}: a byte flipped"
        if in_budget(name):
            record(name, file_damage_trial(work, reference, file, mode, rng))
    for name in (rng.sample(sorted(POINTER_GARBAGE), 1) if args.sample else POINTER_GARBAGE):
        if in_budget(f"'latest' pointer: {name}"):
            record(f"'latest' pointer: {name}", pointer_trial(work, reference, name))
    for name in ([] if args.sample else META_EDITS):
        if in_budget(name):
            record(name, meta_trial(work, reference, name))
    if in_budget("two runs on one output dir") and not args.sample:
        record("two runs on one output dir", two_runs_trial(work, reference))
    if in_budget("full disk") and not args.sample:
        record(*full_disk_trial(work, reference, rng))

    rows = list(cases.values())
    header = f"{'case':<48}{'trials':>7}{'corrupt latest':>16}{'failed resumes':>16}{'diverged losses':>17}{'raw tracebacks':>16}"
    print("\n" + header + "\n" + "-" * len(header))
    totals = [0, 0, 0, 0, 0]
    for case in rows:
        counts = [len(case.outcomes), sum(o.corrupt_latest for o in case.outcomes),
                  sum(o.failed_resume for o in case.outcomes), sum(o.diverged for o in case.outcomes),
                  sum(o.traceback for o in case.outcomes)]
        totals = [a + b for a, b in zip(totals, counts)]
        print(f"{case.name:<48}{counts[0]:>7}{counts[1]:>16}{counts[2]:>16}{counts[3]:>17}{counts[4]:>16}")
    print("-" * len(header))
    print(f"{'total':<48}{totals[0]:>7}{totals[1]:>16}{totals[2]:>16}{totals[3]:>17}{totals[4]:>16}")
    print(f"\nseed {args.seed}, {time.time() - began:.0f} s; work dir {work}")
    for case in rows:
        for o in case.outcomes:
            if o.note:
                print(f"  {case.name}: {o.note}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(totals[1:]) else 0


if __name__ == "__main__":
    sys.exit(main())
