"""The fault campaign: the checkpoint system against a hostile environment, on the tiny preset.

    python benchmarks/faults.py                  # the full campaign: 300 trials, about 70 minutes on 2 cores
    python benchmarks/faults.py --sample         # a short sample (the test suite runs it)
    python benchmarks/faults.py --seed 3 --kills 30 --budget_min 40

Cases: kill -9 at random instants (during steps, during sync and async saves, 1 and 2 processes);
every file of the newest checkpoint truncated, flipped or deleted; garbage in the 'latest' pointer;
edited manifests and markers; two runs started on one output dir; a disk that fills up while
checkpoints are written (a small tmpfs when one can be mounted, else a writer that fails at a chosen
byte, in-process); a source file edited between two runs (appended, truncated, swapped, or one byte
changed with its size and mtime kept); a credential hunt over every file, bucket object and stream
of runs that hold secrets (straight, killed and resumed, refused on a busy dir, refused for a bad
flag); a plain Accelerate loop with dropout (examples/accelerate_loop.py) killed at random; an
object store that disappears for good in the middle of a run. After each fault the run is resumed
from 'latest' in a fresh process and its per-step losses are compared bitwise with an
uninterrupted run of the same world size.

One process at a time, 1 OpenMP thread, seeded; stops starting trials when --budget_min is spent.
Prints one table: trials, and the failures per case (all zero is the pass mark): a 'latest' that
resolves to a checkpoint that does not load ("corrupt latest"), a resume that fails (or a run that
ends with the wrong exit status), a loss that differs from the uninterrupted run, training on a
file's old contents ("stale data"), a secret found in a file, an object or a stream ("leaked"),
and a raw traceback anywhere (the run, the resume, the CLI).
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
    stale: bool = False
    leaked: bool = False
    traceback: bool = False
    note: str = ""

    def failed(self) -> bool:
        return any((self.corrupt_latest, self.failed_resume, self.diverged, self.stale, self.leaked, self.traceback))


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


def run(out: Path, procs: int = 1, extra: list[str] = (), timeout: float = 600, env: dict | None = None,
        args: list[str] = RUN) -> subprocess.CompletedProcess:
    cmd = command(out, procs, list(extra))
    if args is not RUN:  # another recipe run: its flags instead of the campaign's
        cmd = [sys.executable, str(RECIPE), *args, *extra, "--output_dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env={**env_for(procs), **(env or {})},
                          cwd=REPO, timeout=timeout)


def start(out: Path, procs: int = 1, extra: list[str] = (), env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(out, procs, list(extra)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**env_for(procs), **(env or {})}, cwd=REPO)


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
    "missing step": lambda p: p.write_text("step-999\n"), "a link to /etc/passwd": lambda p: (p.unlink(),
                                                                                              p.symlink_to("/etc/passwd")),
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
        first = out / "checkpoints" / "step-1" / "COMPLETE"
        deadline = time.time() + 300
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)  # training has begun (a full disk while preparing data: tests/unit/test_trust.py)
        time.sleep(rng.uniform(0, 1.5))
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


# ------------------------------------------------------------------- data edited between runs
DATA_RUN = [a for a in RUN if a not in ("--max_corpus_bytes", "60000")]
WORDS = ("checkpoint resume expert router token layer gradient shard bucket epoch sample batch loss "
         "optimizer momentum matrix tensor device process signal commit manifest pointer").split()


def write_text(path: Path, rng: random.Random, size: int) -> None:
    words = []
    while sum(len(w) + 1 for w in words) < size:
        words.append(rng.choice(WORDS) + ("." if rng.random() < 0.1 else ""))
    path.write_text(" ".join(words) + "\n")


def edit(path: Path, other: Path, mode: str, rng: random.Random) -> None:
    data = path.read_bytes()
    stat = path.stat()
    if mode == "appended":
        path.write_bytes(data + b" appended later: " + bytes(rng.choice(WORDS), "ascii") * 40)
    elif mode == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif mode == "swapped with the other file":
        path.write_bytes(other.read_bytes())
        other.write_bytes(data)
    else:  # one byte changed, size and mtime kept: only the contents tell
        i = rng.randrange(len(data) - 1)
        data = data[:i] + bytes([b"xyz"[rng.randrange(3)] if data[i] != ord("x") else ord("y")]) + data[i + 1:]
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


EDITS = ("appended", "truncated", "swapped with the other file", "one byte changed, size and mtime kept")


def edited_source_trial(work: Path, rng: random.Random, mode: str) -> Outcome:
    """Train on two files, edit one, then: a resume in the same output dir must be refused naming the
    file; a fresh run there (its old data cache still on disk) must train on the new contents, i.e.
    step for step as a run on the edited files in a clean dir; prepare-data rerun on an explicit
    output must refuse naming the file."""
    from accel_trainer.cli import main as cli_main

    folder = work / f"edit-{rng.randrange(10**9)}"
    folder.mkdir()
    files = [folder / "a.txt", folder / "b.txt"]
    for f in files:
        write_text(f, rng, 30_000)
    data = ["--data_files", *map(str, files), "--eval_steps", "0", "--save_steps", "2", "--max_steps", "4"]
    out, clean, prepared = folder / "run", folder / "clean", folder / "prepared"
    outcome = Outcome()
    first = run(out, args=DATA_RUN, extra=data)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        prepare = ["prepare-data", "--data_files", *map(str, files), "--output_dir", str(prepared), "--num_proc", "1"]
        prepared_ok = cli_main(prepare) == 0
    target = rng.choice(files)
    edit(target, files[1 - files.index(target)], mode, rng)
    edited = sorted({str(target), *(map(str, files) if mode.startswith("swapped") else ())})
    # 1. the resume: refused in one line naming the file(s)
    resumed = run(out, args=DATA_RUN, extra=[*data[:-1], "8", "--resume_from_checkpoint", "latest"])
    outcome.traceback |= has_traceback(first.stdout, first.stderr, resumed.stdout, resumed.stderr)
    if first.returncode != 0:
        outcome.failed_resume, outcome.note = True, f"first run: exit {first.returncode}"
        return outcome
    if resumed.returncode == 0 or max(losses(out), default=0) > 4:
        outcome.stale, outcome.note = True, f"a resume on the edited data ran (exit {resumed.returncode})"
    elif resumed.returncode != 2 or not all(f in resumed.stderr for f in edited):
        outcome.failed_resume = True
        outcome.note = f"resume: exit {resumed.returncode}: {(resumed.stderr.strip().splitlines() or ['?'])[-1][:150]}"
    # 2. a fresh run in the same dir, its old cache on disk, against one in a clean dir
    for name in ("checkpoints", "metrics.jsonl", "exit_status.json"):
        shutil.rmtree(out / name, ignore_errors=True) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    again, reference = run(out, args=DATA_RUN, extra=data), run(clean, args=DATA_RUN, extra=data)
    outcome.traceback |= has_traceback(again.stdout, again.stderr, reference.stdout, reference.stderr)
    if again.returncode or reference.returncode:
        outcome.failed_resume, outcome.note = True, f"fresh runs: exit {again.returncode}, {reference.returncode}"
    elif losses(out) != losses(clean):
        outcome.stale, outcome.note = True, "a fresh run in the same dir trained on the old tokens"
    # 3. prepare-data again on its explicit output: refused naming the file
    if prepared_ok:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = cli_main(prepare)
        if code == 0:
            outcome.stale, outcome.note = True, "prepare-data kept the old preparation of an edited file"
        elif code != 2 or not any(f in buffer.getvalue() for f in edited):
            outcome.failed_resume, outcome.note = True, f"prepare-data: exit {code}"
        outcome.traceback |= has_traceback(buffer.getvalue())
    shutil.rmtree(folder, ignore_errors=True)
    return outcome


# -------------------------------------------------------------------- an object store on 127.0.0.1
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def object_store():
    """moto's S3 server in a process of its own (so that it can disappear): yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import urllib.request

        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        yield endpoint, server
    finally:
        server.kill()
        server.wait()


def make_bucket(endpoint: str, bucket: str, options: dict | None = None) -> None:
    import s3fs

    s3fs.S3FileSystem(**{"key": AWS["AWS_ACCESS_KEY_ID"], "secret": AWS["AWS_SECRET_ACCESS_KEY"],
                         **(options or {}), "endpoint_url": endpoint}).mkdir(bucket)


def store_gone_trial(work: Path, reference: Path, rng: random.Random) -> Outcome:
    """The object store disappears for good at a random step: the run trains on, keeps every checkpoint
    locally, ends with exit status 4 (not a plain 'finished'); a resume from the local tier is exact."""
    out = work / f"store-{rng.randrange(10**9)}"
    outcome = Outcome()
    with object_store() as (endpoint, server):
        make_bucket(endpoint, "campaign")
        options = json.dumps({"endpoint_url": endpoint, "config_kwargs": {"retries": {"max_attempts": 1},
                                                                          "connect_timeout": 1, "read_timeout": 2}})
        proc = start(out, 1, ["--checkpoint_upload_to", "s3://campaign/run", "--storage_options", options], env=AWS)
        step = rng.choice([2, 4, 6, 8])
        marker = out / "checkpoints" / f"step-{step}" / "COMPLETE"
        deadline = time.time() + 300
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.5))
        # The final checkpoint cannot have been uploaded before it exists here: then the store is
        # behind at the end for sure (exit 4); after it, the last upload may have made it (0 or 4).
        final_not_saved = not (out / "checkpoints" / f"step-{STEPS}").exists()
        server.kill()  # for good
        stdout, stderr = proc.communicate(timeout=600)
    outcome.traceback = has_traceback(stdout, stderr)
    expected = (4,) if final_not_saved else (0, 4)
    if proc.returncode not in expected:
        outcome.failed_resume, outcome.note = True, f"exit {proc.returncode} (expected {expected}): {stderr[-200:]}"
    elif outcome.traceback:
        outcome.note = "traceback: " + stderr[stderr.rfind("Traceback"):][-300:]
    if losses(out) != losses(reference):
        outcome.diverged = True
    resume_and_compare(out, reference, 1, outcome)  # from the local tier, as a user would
    shutil.rmtree(out, ignore_errors=True)
    return outcome


# -------------------------------------------------------------------------------- credentials
HUNT_SCENARIOS = ("straight", "killed and resumed", "refused on a busy dir", "refused for a bad flag")


def credential_trial(work: Path, rng: random.Random, scenario: str) -> Outcome:
    """Runs that hold secrets (storage options, a session token, a token in the environment and on the
    command line, a password in a URL): none may appear in any file of the run, any object uploaded,
    the lock, or any stream."""
    tag = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(12))
    secrets = {"key": f"AKIA{tag}", "secret": f"Secr3t{tag}", "token": f"SessTok{tag}",
               "hf": f"hf_{tag}{tag}", "password": f"pw{tag}"}
    out = work / f"creds-{tag}"
    streams: list[str] = []
    with object_store() as (endpoint, _):
        make_bucket(endpoint, "hunt")
        options = {"endpoint_url": endpoint, "key": secrets["key"], "secret": secrets["secret"],
                   "client_kwargs": {"aws_session_token": secrets["token"]}}
        flags = ["--checkpoint_upload_to", f"s3://hunt/{tag}", "--storage_options", json.dumps(options),
                 "--report_to", "tensorboard", "--run_name", "hunt"]
        env = {"HF_TOKEN": secrets["hf"], "WANDB_API_KEY": f"wandb{tag}", "AWS_SESSION_TOKEN": secrets["token"]}
        secrets["wandb"] = f"wandb{tag}"
        if scenario == "straight":
            proc = run(out, 1, flags, env=env)
            streams += [proc.stdout, proc.stderr]
        elif scenario == "killed and resumed":
            proc = start(out, 1, flags, env=env)
            deadline = time.time() + 300
            while not (out / "checkpoints" / "step-4" / "COMPLETE").exists() and proc.poll() is None \
                    and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 1.5))
            kill_all(out)
            streams += list(proc.communicate())
            again = run(out, 1, [*flags, "--resume_from_checkpoint", "latest"], env=env)
            streams += [again.stdout, again.stderr]
        elif scenario == "refused on a busy dir":
            holder = start(out, 1, [*flags, "--max_steps", "400"], env=env)
            deadline = time.time() + 120
            while not (out / ".lock").exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            # the second run's own flags hold a password in a URL too; it is refused (the dir is busy)
            second = run(out, 1, [*flags, "--checkpoint_upload_to", f"s3://user:{secrets['password']}@hunt/{tag}"],
                         env=env, timeout=120)
            if second.returncode != 2 or "in use by another run" not in second.stderr:
                streams.append(f"Traceback (most recent call last): second run exit {second.returncode}")
            streams += [second.stdout, second.stderr, (out / ".lock").read_text(errors="replace")
                        if (out / ".lock").exists() else ""]
            kill_all(out)
            streams += list(holder.communicate())
        else:  # bad input next to the secrets: the one-line error must not repeat them
            bad = run(out, 1, [*flags, "--max_steps", "-5", "--checkpoint_upload_to",
                               f"s3://user:{secrets['password']}@hunt/{tag}"], env=env)
            streams += [bad.stdout, bad.stderr]
        objects = []
        try:
            import s3fs

            fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=endpoint)
            objects = [fs.cat_file(p) for p in fs.find(f"hunt/{tag}")]
        except Exception as err:  # the store held nothing of this run: nothing to hunt there
            objects = [] if "NoSuchKey" in str(err) or isinstance(err, FileNotFoundError) else [repr(err).encode()]
    outcome = Outcome(traceback=has_traceback(*streams))
    if scenario in ("straight", "killed and resumed") and not objects:  # the secrets were not even used
        outcome.failed_resume, outcome.note = True, f"{scenario}: nothing was uploaded with the credentials"
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()] + objects
    found = sorted({name for name, value in secrets.items()
                    if any(value in text for text in streams) or any(value.encode() in b for b in blobs)})
    if found:
        outcome.leaked, outcome.note = True, f"{scenario}: found {found}"
    shutil.rmtree(out, ignore_errors=True)
    return outcome


# ------------------------------------------------------------------ a plain loop with dropout
EXAMPLE = REPO / "examples" / "accelerate_loop.py"
LOOP = ["--max_steps", "60", "--save_steps", "3", "--eval_steps", "6"]


def loop_losses(stdout: str) -> dict[int, float]:
    """``{"step": N, "loss": X}`` lines the loop printed (a last line cut by the kill is left out)."""
    found = {}
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(line)
            found[record["step"]] = record["loss"]
    return found


def dropout_loop_trial(work: Path, expected: dict[int, float], rng: random.Random) -> Outcome:
    """examples/accelerate_loop.py (attention dropout, a shuffled loader) killed at a random instant and
    resumed: every step's loss equals the uninterrupted loop's, bitwise."""
    out = work / f"loop-{rng.randrange(10**9)}"
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), *LOOP, "--output_dir", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-3" / "COMPLETE").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 3.0))  # mid-step, mid-save, or (now and then) after the end
    kill_all(out)
    stdout, stderr = proc.communicate()
    outcome = Outcome(traceback=has_traceback(stderr) and proc.returncode not in (-9, 0))
    resumed = subprocess.run([sys.executable, str(EXAMPLE), *LOOP, "--output_dir", str(out),
                              "--resume_from_checkpoint", "latest"], cwd=REPO, env=ENV, capture_output=True, text=True)
    outcome.traceback |= has_traceback(resumed.stdout, resumed.stderr)
    if resumed.returncode != 0:
        outcome.failed_resume, outcome.note = True, (resumed.stderr.strip().splitlines() or ["?"])[-1][:200]
    else:  # every step, from the killed run or (repeated or not) from the resumed one, as uninterrupted
        got = {**loop_losses(stdout), **loop_losses(resumed.stdout)}
        if sorted(got) != sorted(expected) or any(got[s] != expected[s] for s in got):
            outcome.diverged = True
            outcome.note = f"steps differ: {[s for s in expected if got.get(s) != expected[s]][:5]}"
    shutil.rmtree(out, ignore_errors=True)
    return outcome


# ------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=16, help="kill -9 trials per kind (6 kinds)")
    parser.add_argument("--edits", type=int, default=6, help="edited-source trials per kind of edit (4 kinds)")
    parser.add_argument("--hunts", type=int, default=8, help="credential hunts per scenario (4 scenarios)")
    parser.add_argument("--loops", type=int, default=75, help="kills of the plain loop with dropout")
    parser.add_argument("--stores", type=int, default=25, help="runs whose object store disappears")
    parser.add_argument("--budget_min", type=float, default=100, help="start no trial after this many minutes")
    parser.add_argument("--sample", action="store_true",
                        help="a short sample: one trial of each kind of fault but the kill, damage and pointer "
                             "kinds (one of those each)")
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
        flag = f"  FAILED {outcome}" if outcome.failed() else ""
        print(f"[{time.time() - began:6.0f}s] {name}{flag}", flush=True)

    def in_budget(name: str = "") -> bool:
        wanted = args.only is None or args.only in name
        return wanted and time.time() - began < args.budget_min * 60

    if args.sample:
        args.kills, args.edits, args.hunts, args.loops, args.stores = 1, 1, 1, 1, 1
    kills = args.kills
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
    for _ in range(args.edits):
        for mode in (rng.sample(EDITS, 1) if args.sample else EDITS):
            if in_budget(f"source edited: {mode}"):
                record(f"source edited: {mode}", edited_source_trial(work, rng, mode))
    for _ in range(args.hunts):
        for scenario in (rng.sample(HUNT_SCENARIOS, 1) if args.sample else HUNT_SCENARIOS):
            if in_budget(f"credential hunt: {scenario}"):
                record(f"credential hunt: {scenario}", credential_trial(work, rng, scenario))
    if args.loops and in_budget("plain loop with dropout"):
        straight = subprocess.run([sys.executable, str(EXAMPLE), *LOOP, "--output_dir", str(work / "loop-reference")],
                                  cwd=REPO, env=ENV, capture_output=True, text=True)
        assert straight.returncode == 0, "the plain loop's reference run failed:\n" + straight.stderr[-2000:]
        for _ in range(args.loops):
            if in_budget("plain loop with dropout"):
                record("kill -9, plain loop with dropout", dropout_loop_trial(work, loop_losses(straight.stdout), rng))
    for _ in range(args.stores):
        if in_budget("object store gone"):
            record("object store gone for good mid-run", store_gone_trial(work, reference, rng))

    rows = list(cases.values())
    columns = ("corrupt latest", "failed resumes", "diverged losses", "stale data", "leaked secrets", "raw tracebacks")
    fields = ("corrupt_latest", "failed_resume", "diverged", "stale", "leaked", "traceback")
    header = f"{'case':<56}{'trials':>7}" + "".join(f"{c:>16}" for c in columns)
    print("\n" + header + "\n" + "-" * len(header))
    totals = [0] * (len(columns) + 1)
    for case in rows:
        counts = [len(case.outcomes)] + [sum(getattr(o, f) for o in case.outcomes) for f in fields]
        totals = [a + b for a, b in zip(totals, counts)]
        print(f"{case.name:<56}{counts[0]:>7}" + "".join(f"{c:>16}" for c in counts[1:]))
    print("-" * len(header))
    print(f"{'total':<56}{totals[0]:>7}" + "".join(f"{c:>16}" for c in totals[1:]))
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
