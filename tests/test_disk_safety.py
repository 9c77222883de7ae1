"""A save that does not fit, or fails half-way, never damages existing checkpoints; by default the
run warns and trains on, with --save_strict it stops with one clear line."""

import json
import subprocess
import sys

import pytest

from accel_trainer.checkpoint.layout import read_pointer
from conftest import REPO, TINY

pytestmark = pytest.mark.slow
ARGS = [*TINY, "--max_steps", "6", "--save_steps", "2", "--eval_steps", "0"]


def run_with(patch: str, out, *extra):
    script = (f"import sys; sys.argv[0] = 'moe18b.py'; sys.path.insert(0, {str(REPO)!r})\n"
              "import accel_trainer.checkpoint.manager as manager\n" + patch +
              "from recipes.moe18b import main\n"
              f"sys.exit(main({[*ARGS, '--output_dir', str(out), *extra]!r}))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)


NO_ROOM_AT_STEP_4 = (
    # The second save (step 4) finds 1000 bytes free on the checkpoints filesystem.
    "import collections, shutil\n"
    "real, calls = shutil.disk_usage, []\n"
    "def disk_usage(path):\n"
    "    if str(path).endswith('checkpoints'):\n"
    "        calls.append(path)\n"
    "        if len(calls) == 2:\n"
    "            return collections.namedtuple('Usage', 'total used free')(10**9, 10**9 - 1000, 1000)\n"
    "    return real(path)\n"
    "shutil.disk_usage = disk_usage\n")

ENOSPC_WHILE_WRITING_STEP_4 = (
    "original = manager.write_file\n"
    "def failing(file, path):\n"
    "    if '.tmp-step-4' in str(path):\n"
    "        raise OSError(28, 'No space left on device', str(path))\n"
    "    return original(file, path)\n"
    "manager.write_file = failing\n")


@pytest.mark.parametrize("patch,expect", [
    (NO_ROOM_AT_STEP_4, "checkpoint at step 4 not saved: it needs about"),
    (ENOSPC_WHILE_WRITING_STEP_4, "checkpoint at step 4 not saved: No space left on device"),
])
def test_failed_or_oversized_save_is_skipped_and_training_goes_on(tmp_path, patch, expect):
    proc = run_with(patch, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"WARNING: {expect}" in proc.stdout and "the previous checkpoints are intact" in proc.stdout
    root = tmp_path / "checkpoints"
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-2", "step-6"] and not list(root.glob(".tmp-*"))
    assert read_pointer(root, "latest").name == "step-6"
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1] == 6


def test_save_strict_stops_with_one_line_and_keeps_checkpoints(tmp_path):
    proc = run_with(ENOSPC_WHILE_WRITING_STEP_4, tmp_path, "--save_strict")
    assert proc.returncode == 2
    assert "checkpoint at step 4 not saved: No space left on device" in proc.stderr and "(--save_strict)" in proc.stderr
    assert "Traceback" not in proc.stderr
    root = tmp_path / "checkpoints"
    assert (root / "step-2" / "COMPLETE").exists() and not (root / "step-4").exists()


def test_failed_background_write_is_skipped_and_never_becomes_latest(tmp_path):
    proc = run_with(ENOSPC_WHILE_WRITING_STEP_4, tmp_path, "--async_save")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "background checkpoint write failed (OSError: [Errno 28] No space left on device" in proc.stdout
    root = tmp_path / "checkpoints"
    assert not (root / "step-4").exists() and read_pointer(root, "latest").name == "step-6"
