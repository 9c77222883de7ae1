"""The documented two-process CPU launch really runs two processes."""

import os
import subprocess
import sys
from pathlib import Path

from launching import REPO, TINY, free_port

CONFIGS = REPO / "accelerate_configs"


def test_documented_two_process_cpu_command_runs_two_processes(tmp_path):
    """ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml ..."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
         "--main_process_port",
         str(free_port()), "recipes/moe18b.py", *TINY, "--max_steps", "2", "--eval_steps", "0",
         "--output_dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) [DistributedType.MULTI_CPU]" in proc.stdout
    manifest = (tmp_path / "checkpoints" / "step-2" / "manifest.json").read_text()
    assert '"world_size": 2' in manifest
