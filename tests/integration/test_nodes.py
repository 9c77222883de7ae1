"""Two nodes without a shared file system (each rank sees its own mount of --output_dir, made here
with a mount namespace, as two cloud VMs with local disks): every node stops before any work with
one line in its own log naming --output_dir, exit 2, and nothing is committed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from launching import RECIPE, REPO, TINY, free_port

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and unshare(1) to give one rank its own mount")


def test_each_node_says_in_its_own_log_that_the_output_dir_is_not_shared(tmp_path):
    out, node1_disk = tmp_path / "run", tmp_path / "node1-disk"
    out.mkdir()
    node1_disk.mkdir()
    port = free_port()
    args = [sys.executable, str(RECIPE), *TINY, "--max_steps", "2", "--output_dir", str(out)]

    def env(rank):
        return {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    node0 = subprocess.Popen(args, env=env(0), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    own_mount = f"mount --make-rprivate / && mount --bind {node1_disk} {out} && exec \"$@\""
    node1 = subprocess.Popen(["unshare", "-m", "sh", "-c", own_mount, "sh", *args], env=env(1), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [p.communicate(timeout=300) for p in (node0, node1)]
    for proc, (_, err) in zip((node0, node1), results):
        assert proc.returncode == 2, err[-3000:]
        assert f"--output_dir='{out}' is not one file system shared by every process" in err, err[-3000:]
        assert "Traceback" not in err
    assert not (out / "checkpoints").exists() and not (out / "data").exists()  # stopped before any work
    assert not list(out.glob(".probe-*")) and not list(node1_disk.glob(".probe-*"))
