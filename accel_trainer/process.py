"""Process life of a run: exit statuses, ``exit_status.json`` for restart scripts, and a clean
end of the process groups. :mod:`.run` composes a run; this module decides how the process ends.

    0  finished            2  bad input (one line on stderr)       3  stopped after non-finite steps
    1  crashed             4  finished, the object store behind
    128 + N  stopped by signal N (emergency checkpoint saved)
"""

from __future__ import annotations

import datetime
import gc
import os
from pathlib import Path

from .checkpoint import read_json, write_json
from .errors import InputError
from .secrets import redact_text


EXIT_STATUS = "exit_status.json"
# What each exit status means, for the status file (restart scripts decide on the code).
EXIT_MEANINGS = {0: "finished", 1: "crashed (an unexpected error; see the log)", 2: "bad input (flags, data or "
                 "checkpoint): fix the command, a retry would fail the same way", 3: "stopped after non-finite "
                 "losses or gradients (checkpoint of the last good step saved)", 4: "finished, but the object store "
                 "does not hold the newest checkpoints (uploads failed); the local checkpoints are complete"}


def write_exit_status(output_dir: str | None, code: int | None, reason: str, step: int | None = None) -> None:
    """``<output_dir>/exit_status.json``: the run's own exit status and reason, for restart scripts
    behind ``accelerate launch`` (which turns every failure into exit status 1). ``code`` None means
    running: a file still saying so after the process ended means it was killed (kill -9, OOM killer)."""
    if not output_dir or not _is_main_process():
        return
    meaning = "running" if code is None else EXIT_MEANINGS.get(code, "stopped by a signal (emergency checkpoint saved)"
                                                               if code > 128 else "failed")
    record = {"exit_code": code, "meaning": meaning, "reason": redact_text(reason), "step": step, "pid": os.getpid(),
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(output_dir) / EXIT_STATUS
    try:
        if code is not None and _another_live_run(path):
            return  # a run refused because another one trains here must not overwrite that one's status
        if code is None:
            _STARTED.add(str(path.resolve()))
        elif code == 2 and str(path.resolve()) not in _STARTED and _a_runs_outcome(path):
            return  # a command refused before it started leaves the status of the run that ended here
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{EXIT_STATUS}.tmp")
        write_json(tmp, record)
        os.chmod(tmp, 0o600)  # its reason may quote the command's error
        os.replace(tmp, path)
    except OSError:
        pass  # a status file must never be why a run fails


def _is_main_process(local: bool = False) -> bool:
    """Whether this is the main process, also when the process group never started (a restarted
    rank that cannot reach the others): Accelerate's state is then half-built, so the launcher's
    ``RANK``/``LOCAL_RANK`` decide."""
    from accelerate import PartialState

    try:
        state = PartialState()
        return state.is_local_main_process if local else state.is_main_process
    except (AttributeError, RuntimeError, ValueError):
        return int(os.environ.get("LOCAL_RANK" if local else "RANK", "0") or 0) == 0


# Status files this invocation marked "running" (its own run started; its outcome is its to write).
_STARTED: set[str] = set()


def _a_runs_outcome(path: Path) -> bool:
    """The status file records how a run ended."""
    try:
        return read_json(path).get("exit_code") is not None
    except (InputError, OSError, AttributeError):
        return False


def _another_live_run(path: Path) -> bool:
    try:
        record = read_json(path)
        pid = record.get("pid")
        if record.get("exit_code") is not None or not isinstance(pid, int) or pid == os.getpid():
            return False
        os.kill(pid, 0)
        return True
    except (InputError, OSError, AttributeError):
        return False


def die_with_launcher() -> bool:
    """Under a launcher (``accelerate launch``, ``torchrun``): ask Linux to send this worker SIGTERM
    when its launcher dies, even by SIGKILL. torch elastic starts each worker in a session of its
    own, so a kill of the launcher's process group would otherwise leave the workers training and
    writing checkpoints with nobody to wait for them; SIGTERM makes each save its emergency
    checkpoint and end, so nothing is left saying "running". Returns whether it was set.
    """
    import ctypes
    import signal
    import sys

    launched = any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND"))
    if not launched or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if parent == 1 or os.getppid() != parent:  # the launcher died before the request: end now
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def join_this_rounds_process_group() -> bool:
    """In a round restarted by ``accelerate launch --max_restarts`` (torch elastic): start the process
    group on a namespace of the launcher's store that is this round's own. The launcher keeps one store
    for every round, and the keys the ranks exchange their addresses under are the same each round, so
    a rank of the new round could read the address a dead rank of the old round left there and fail
    connecting to it ("Connection refused"). Accelerate then uses this group. Returns whether it did.
    """
    import datetime

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if not restart or restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    on_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true") or not torch.cuda.is_available()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    timeout = datetime.timedelta(minutes=30)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group("gloo" if on_cpu else "cuda:nccl,cpu:gloo", store=dist.PrefixStore(
        f"/accel_trainer/round_{restart}", store), rank=rank, world_size=world, timeout=timeout)
    if rank == 0:
        import sys

        print(f"restart {restart} (accelerate launch --max_restarts): the ranks joined this round's process group",
              file=sys.stderr)
    return True


def exit_code_of(job, output_dir: str | None = None) -> int:
    """Run ``job``; turn bad input (flags, data, checkpoints) into one line on stderr and exit status
    2, a stop signal into 128 + signal number after its emergency checkpoint, and a run stopped by
    non-finite losses into 3 (after its checkpoint of the last good state). The status and its
    reason also go to ``<output_dir>/exit_status.json``."""
    import sys

    step = None
    die_with_launcher()
    join_this_rounds_process_group()
    if output_dir:
        _STARTED.discard(str((Path(output_dir) / EXIT_STATUS).resolve()))  # a new invocation
    try:
        trainer = job()
    except InputError as err:
        message = redact_text(str(err))  # an error may quote a flag's value, a URL, a command
        if _is_main_process(local=True):  # every node's log says why the run stopped
            print(f"error: {message}", file=sys.stderr)
        code, reason = 2, message
    except BaseException as err:
        write_exit_status(output_dir, 1, redact_text(f"{type(err).__name__}: {err}"))
        raise
    else:
        signum = trainer.checkpointer.stop_signal
        code = 3 if trainer.diverged else 128 + int(signum) if trainer.interrupted_by and signum else 0
        reason, step = trainer.interrupted_by or "finished", trainer.state.global_step
        behind = trainer.checkpointer.remote_behind
        if code == 0 and behind:
            code, reason = 4, f"finished, but {behind}"
            if _is_main_process():
                print(f"error: {redact_text(reason)}; upload the local checkpoints (resume with the same "
                      "--checkpoint_upload_to uploads the next one) or check the store", file=sys.stderr)
        del trainer
    write_exit_status(output_dir, code, reason, step)
    _free_process_groups()
    return code


def _free_process_groups() -> None:
    """Let the process groups die now, while Python is fully alive, not during interpreter shutdown.

    ``destroy_process_group`` (Accelerate's ``end_training``) only unregisters a group: the DDP
    wrapper, the stop-flag group and the reference cycles around the trainer keep the C++ group and
    its gloo worker threads alive. Left to shutdown, a worker thread that frees the last collective's
    tensors needs the GIL after finalisation began, and the process aborts ("terminate called without
    an active exception", exit -6) after a run that finished, now and then.
    Collecting the cycles drops the last reference; the group's destructor joins its (idle) threads.
    An unexpected exception skips this: its traceback holds the trainer, and the run fails anyway.
    """
    from accelerate import PartialState

    try:
        state = PartialState()
    except (AttributeError, RuntimeError, ValueError):  # never started: nothing to free
        return
    try:
        state.destroy_process_group()  # a no-op after end_training; needed when an error came before it
    except AttributeError:  # a half-built state (the group never came up): nothing to free
        return
    gc.collect()
